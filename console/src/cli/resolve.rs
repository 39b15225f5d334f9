//! Devices by name or id prefix, pairing requests by id prefix, as `kubectl` and `tailscale`
//! take them: a pure rule over a list the caller fetched ([`device`], [`request`]), so it is
//! tested without an anchor.
//!
//! A device is found by, in order: its full id (any case, dashes optional), its exact name,
//! its name ignoring case, a unique prefix of its id (at least [`MIN_PREFIX`] characters,
//! dashes ignored). Several matches are an error that lists them; none is an error that
//! suggests the closest name or id when one is close ("did you mean NAME (ID)?").

use anchorage_wire::DeviceId;

use super::{CliError, exit};
use crate::client::ControlPlaneClient;

/// Shortest id prefix taken, in characters without dashes (shorter ones match too much).
pub const MIN_PREFIX: usize = 4;

/// At most this many matches are listed in an ambiguity error.
const LISTED: usize = 10;

/// A device a name or prefix can designate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// Its id.
    pub id: DeviceId,
    /// Its name (not unique: several devices may share one).
    pub name: String,
}

/// Why a name or prefix designates no single device or request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    /// Nothing matches; `suggestion` is the closest candidate, shown as `NAME (ID)`.
    #[error("{what} {input:?} not found{}", .suggestion.as_ref().map(|s| format!("; did you mean {s}?")).unwrap_or_default())]
    NotFound {
        /// `device` or `pairing request`.
        what: &'static str,
        /// What the user typed.
        input: String,
        /// The closest candidate, if one is close.
        suggestion: Option<String>,
    },
    /// Several match, listed as `NAME (ID)` (at most ten, then how many more).
    #[error("{input:?} matches {} {what}s: {}; give more of the id", .matches.len(), list(.matches))]
    Ambiguous {
        /// `device` or `pairing request`.
        what: &'static str,
        /// What the user typed.
        input: String,
        /// Every match.
        matches: Vec<String>,
    },
}

fn list(matches: &[String]) -> String {
    let mut shown = matches.iter().take(LISTED).cloned().collect::<Vec<_>>();
    if matches.len() > LISTED {
        shown.push(format!("and {} more", matches.len() - LISTED));
    }
    shown.join(", ")
}

/// The id as compared: lower case, no dashes or spaces.
fn compact(text: &str) -> String {
    text.trim()
        .chars()
        .filter(|c| *c != '-' && *c != ' ')
        .map(|c| c.to_ascii_lowercase())
        .collect()
}

fn shown(c: &Candidate) -> String {
    format!("{} ({})", c.name, c.id)
}

/// The one device `input` designates among `devices`, as the module docs say.
pub fn device<'a>(input: &str, devices: &'a [Candidate]) -> Result<&'a Candidate, ResolveError> {
    let input = input.trim();
    let key = compact(input);
    if let Some(c) = devices.iter().find(|c| compact(&c.id.to_string()) == key) {
        return Ok(c);
    }
    let by_name = |same: &dyn Fn(&str) -> bool| -> Vec<&'a Candidate> {
        devices.iter().filter(|c| same(&c.name)).collect()
    };
    for matches in [
        by_name(&|name| name == input),
        by_name(&|name| name.eq_ignore_ascii_case(input)),
    ] {
        if let Some(found) = one(input, "device", matches, shown)? {
            return Ok(found);
        }
    }
    if key.chars().count() >= MIN_PREFIX {
        let matches: Vec<&Candidate> = devices
            .iter()
            .filter(|c| compact(&c.id.to_string()).starts_with(&key))
            .collect();
        if let Some(found) = one(input, "device", matches, shown)? {
            return Ok(found);
        }
    }
    let suggestion = closest(
        input,
        devices
            .iter()
            .flat_map(|c| [(c.name.clone(), c), (c.id.to_string(), c)]),
    )
    .map(shown);
    Err(ResolveError::NotFound {
        what: "device",
        input: input.to_string(),
        suggestion,
    })
}

/// The one pairing request id `input` designates among `ids`: the id itself, or a unique
/// prefix of one (any case).
pub fn request<'a>(input: &str, ids: &'a [String]) -> Result<&'a str, ResolveError> {
    let input = input.trim();
    if let Some(id) = ids.iter().find(|id| id.eq_ignore_ascii_case(input)) {
        return Ok(id);
    }
    let lower = input.to_ascii_lowercase();
    let matches: Vec<&String> = ids
        .iter()
        .filter(|id| !input.is_empty() && id.to_ascii_lowercase().starts_with(&lower))
        .collect();
    if let Some(found) = one(input, "pairing request", matches, |id| id.to_string())? {
        return Ok(found);
    }
    let suggestion = closest(input, ids.iter().map(|id| (id.clone(), id))).cloned();
    Err(ResolveError::NotFound {
        what: "pairing request",
        input: input.to_string(),
        suggestion,
    })
}

/// `Some` for one match, `None` for none, an error for several.
fn one<T>(
    input: &str,
    what: &'static str,
    matches: Vec<T>,
    show: impl Fn(T) -> String,
) -> Result<Option<T>, ResolveError> {
    let mut matches = matches;
    match matches.len() {
        0 => Ok(None),
        1 => Ok(matches.pop()),
        _ => Err(ResolveError::Ambiguous {
            what,
            input: input.to_string(),
            matches: matches.into_iter().map(show).collect(),
        }),
    }
}

/// The item whose text is closest to `input`, if it is close: a few edits away for its
/// length (a typo, a swapped pair), compared ignoring case and dashes.
fn closest<T>(input: &str, items: impl Iterator<Item = (String, T)>) -> Option<T> {
    let key = compact(input);
    if key.is_empty() {
        return None;
    }
    items
        .filter_map(|(text, item)| {
            let text = compact(&text);
            // A prefix of an id is compared with as much of the id.
            let text: String = if text.len() > key.len() + 3 && key.len() >= MIN_PREFIX {
                text.chars().take(key.chars().count()).collect()
            } else {
                text
            };
            let distance = strsim::damerau_levenshtein(&key, &text);
            let allowed = (text.chars().count().max(key.chars().count()) / 3).clamp(1, 3);
            (distance <= allowed).then_some((distance, item))
        })
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, item)| item)
}

impl From<ResolveError> for CliError {
    fn from(e: ResolveError) -> CliError {
        let code = match e {
            ResolveError::NotFound { .. } => "not_found",
            ResolveError::Ambiguous { .. } => "ambiguous",
        };
        CliError::new(exit::FAILURE, code, e.to_string())
    }
}

/// The lookups of the commands: they fetch the list, then apply the rules above. (They take
/// the client, not the command's context, whose output need not be `Sync`.)
pub(super) struct Lookup<'a>(pub(super) &'a ControlPlaneClient);

impl Lookup<'_> {
    /// The device id `input` designates. A full id is taken as it is (the anchor answers for
    /// it); anything else is looked up in the device list. A token that may not list devices
    /// has its input passed on unchanged.
    pub(super) async fn device_id(&self, input: &str) -> Result<String, CliError> {
        if input.parse::<DeviceId>().is_ok() {
            return Ok(input.trim().to_string());
        }
        let Some(candidates) = self.candidates().await? else {
            return Ok(input.to_string());
        };
        Ok(device(input, &candidates)?.id.to_string())
    }

    /// `audit --target`: a device by name or prefix becomes its id; anything else (a
    /// request, code or token id) is passed on.
    pub(super) async fn audit_target(&self, input: String) -> Result<String, CliError> {
        if input.parse::<DeviceId>().is_ok() {
            return Ok(input);
        }
        match self.candidates().await? {
            Some(candidates) => Ok(device(&input, &candidates)
                .map(|c| c.id.to_string())
                .unwrap_or(input)),
            None => Ok(input),
        }
    }

    /// The pairing request id `input` designates: itself, or the one request whose id it
    /// begins. A token that may not list requests has its input passed on unchanged.
    pub(super) async fn request_id(&self, input: &str) -> Result<String, CliError> {
        let ids: Vec<String> = match self.0.list_requests(None).await {
            Ok(list) => list.into_iter().map(|r| r.request_id).collect(),
            Err(e) if matches!(e.status(), Some(401 | 403)) => return Ok(input.to_string()),
            Err(e) => return Err(e.into()),
        };
        Ok(request(input, &ids)?.to_string())
    }

    async fn candidates(&self) -> Result<Option<Vec<Candidate>>, CliError> {
        match self.0.list_devices().await {
            Ok(list) => Ok(Some(
                list.into_iter()
                    .map(|d| Candidate {
                        id: d.device_id,
                        name: d.name,
                    })
                    .collect(),
            )),
            Err(e) if matches!(e.status(), Some(401 | 403)) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn candidates() -> Vec<Candidate> {
        let c = |byte: u8, last: u8, name: &str| {
            let mut bytes = [byte; 20];
            bytes[19] = last;
            Candidate {
                id: DeviceId::from_bytes(bytes),
                name: name.into(),
            }
        };
        vec![
            c(0, 0, "kitchen-pi"),
            c(0, 1, "garage-cam"),
            c(0xff, 0, "Lab-Router"),
        ]
    }

    #[test]
    fn a_full_id_a_name_or_a_unique_prefix_designates_a_device() {
        let list = candidates();
        let garage = list[1].id.to_string();
        assert_eq!(device(&garage, &list).unwrap().name, "garage-cam");
        assert_eq!(
            device(&garage.to_uppercase().replace('-', ""), &list)
                .unwrap()
                .name,
            "garage-cam"
        );
        assert_eq!(device("kitchen-pi", &list).unwrap().id, list[0].id);
        assert_eq!(device("lab-router", &list).unwrap().id, list[2].id);
        // The last id differs from the others in its first characters.
        let lab = list[2].id.to_string();
        assert_eq!(device(&lab[..5], &list).unwrap().name, "Lab-Router");
    }

    #[test]
    fn a_prefix_shared_by_several_devices_lists_them() {
        let list = candidates();
        let err = device("aaaa", &list).unwrap_err();
        let ResolveError::Ambiguous { matches, .. } = &err else {
            panic!("{err:?}")
        };
        assert_eq!(matches.len(), 2);
        let text = err.to_string();
        assert!(text.contains("matches 2 devices"), "{text}");
        assert!(
            text.contains(&format!("kitchen-pi ({})", list[0].id)),
            "{text}"
        );
        assert!(text.contains("garage-cam ("), "{text}");
        assert!(text.ends_with("give more of the id"), "{text}");
    }

    #[test]
    fn two_devices_with_one_name_are_ambiguous() {
        let mut list = candidates();
        list[1].name = "kitchen-pi".into();
        assert!(matches!(
            device("kitchen-pi", &list),
            Err(ResolveError::Ambiguous { .. })
        ));
    }

    #[test]
    fn a_near_miss_suggests_the_closest_device() {
        let list = candidates();
        let err = device("kitchn-pi", &list).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "device \"kitchn-pi\" not found; did you mean kitchen-pi ({})?",
                list[0].id
            )
        );
        // Far from everything: no suggestion.
        let err = device("printer", &list).unwrap_err();
        assert_eq!(err.to_string(), "device \"printer\" not found");
        // Too short a prefix is not taken, however many it would match.
        assert!(matches!(
            device("aa", &list),
            Err(ResolveError::NotFound { .. })
        ));
    }

    #[test]
    fn request_ids_by_prefix() {
        let ids = vec!["REQ-1".to_string(), "REQ-22".into(), "XYZ-9".into()];
        assert_eq!(request("req-1", &ids), Ok("REQ-1"));
        assert_eq!(request("X", &ids), Ok("XYZ-9"));
        assert_eq!(request("REQ-2", &ids), Ok("REQ-22"));
        let err = request("REQ", &ids).unwrap_err();
        assert_eq!(
            err.to_string(),
            "\"REQ\" matches 2 pairing requests: REQ-1, REQ-22; give more of the id"
        );
        let err = request("REQ-3", &ids).unwrap_err();
        assert!(err.to_string().contains("did you mean REQ-1?"), "{err}");
    }
}
