//! `anchorctl inventory --watch`: the inventory again whenever a device's presence changes.
//!
//! Driven by the event stream (`/console/v1/events`): each event makes it fetch the inventory
//! and compare every device's presence with what it last printed; it also fetches every
//! [`WATCH_REFRESH`] (a fallback for a stream that is down, or events it does not carry), and
//! reopens a dropped stream then. It prints only when something changed: the table (on a
//! terminal, redrawn in place), or with `--json` one inventory document per line.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use futures_util::{Stream, StreamExt};

use super::format::clock;
use super::{CliError, Ctx, encode_error, human_inventory};
use crate::api::{DeviceFilter, DeviceId, Event, Inventory, Presence};
use crate::client::ClientError;

/// How often the inventory is fetched without an event.
pub const WATCH_REFRESH: Duration = Duration::from_secs(30);

type Events = Pin<Box<dyn Stream<Item = Result<Event, ClientError>> + Send>>;

/// What a change is: the devices shown and their presence.
fn presence_of(inventory: &Inventory) -> Vec<(DeviceId, Presence)> {
    inventory
        .devices
        .iter()
        .map(|d| (d.device_id, d.presence))
        .collect()
}

impl Ctx<'_> {
    /// Prints the inventory, then again at every change, until `shutdown`.
    pub(super) async fn watch_inventory(
        &mut self,
        filter: &DeviceFilter,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), CliError> {
        use std::io::IsTerminal;
        let mut shutdown = std::pin::pin!(shutdown);
        let redraw = !self.json && self.color && std::io::stdout().is_terminal();
        let mut events: Option<Events> = None;
        let mut shown: Option<Vec<(DeviceId, Presence)>> = None;
        loop {
            if events.is_none() {
                // Without the stream the periodic fetch still shows changes, later.
                events = self
                    .client
                    .events()
                    .await
                    .ok()
                    .map(|s| Box::pin(s) as Events);
            }
            let inventory = self.client.inventory_filtered(filter).await?;
            let now = presence_of(&inventory);
            if shown.as_ref() != Some(&now) {
                self.print_watched(&inventory, redraw)?;
                shown = Some(now);
            }
            let next_event = async {
                match events.as_mut() {
                    Some(stream) => stream.next().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = &mut shutdown => return Ok(()),
                () = tokio::time::sleep(WATCH_REFRESH) => {}
                item = next_event => match item {
                    Some(Ok(_)) => {}
                    Some(Err(ClientError::Decode(_))) => {}
                    // The stream ended or failed: refetch now, reopen it on the next round.
                    Some(Err(_)) | None => events = None,
                },
            }
        }
    }

    fn print_watched(&mut self, inventory: &Inventory, redraw: bool) -> Result<(), CliError> {
        self.now = time::OffsetDateTime::now_utc();
        if self.json {
            let line = serde_json::to_string(inventory).map_err(encode_error)? + "\n";
            return self.write(&line);
        }
        let mut text = String::new();
        if redraw {
            // Home and clear, as `watch` does.
            text.push_str("\x1b[H\x1b[2J");
        }
        text.push_str(&format!(
            "{} · redrawn when presence changes (Ctrl-C to stop)\n",
            clock(self.now)
        ));
        text.push_str(&human_inventory(inventory, self.now));
        if !redraw {
            text.push('\n');
        }
        self.write(&text)
    }
}
