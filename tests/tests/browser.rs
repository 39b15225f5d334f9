//! The web console in a real, headless Chromium, against the real binaries: `anchord` and two
//! `anchor-node`s, each its own process.
//!
//! The page is driven through chromedriver's W3C WebDriver API with the `thirtyfour` client:
//! sign in with the owner token, see the first node `online`, invoke `system.health` and read
//! the result, mint a QR code (an image rendered by the anchor) and a PIN, pair a second node
//! with that PIN and approve it from the page after comparing the SAS, run `system.health` as a
//! batch on a label selector from the inventory and follow it to its counts (the running node
//! succeeds, the one never started times out) and find it in the batches list, revoke the second
//! node and see it go `revoked`, create a read-only token and check what it hides, revoke that
//! token, create a token limited to a selector and capabilities with an expiry and see its
//! limits, expiry and last use listed; pair and run a third node, stop it and see it offline on
//! top of the inventory (problems first), sort by a column and reverse it, read a device's
//! history charts (points, a presence timeline), filter the audit log, and invoke on two ticked
//! rows (a batch of those two). Along the
//! way: no token in a URL, no CSP violation, no request to another origin, no horizontal
//! overflow on a phone-sized window. The inventory's screenshot goes to
//! `docs/console-inventory.png` when `ANCHORAGE_UPDATE_SCREENSHOT` is set (else in the temp dir).
//!
//! Needs `/usr/bin/chromium` and `chromedriver` (Debian: `apt-get install chromium
//! chromium-driver`). Without them the test prints why and passes, unless
//! `ANCHORAGE_BROWSER_TEST=1` (as in `.ci/run`), where it fails.
//!
//! `ANCHORAGE_BROWSER=firefox` drives Firefox instead, through geckodriver: `/usr/bin/firefox-esr`
//! (Debian: `apt-get install firefox-esr`) and `geckodriver` on the `PATH` (Debian does not
//! package it; `cargo install geckodriver` builds it from crates.io). CI runs Chromium only.
//!
//! The binaries are those of this test's target directory (`target/debug`), rebuilt first with
//! `cargo build --bins` under cargo (a no-op when fresh; see `anchorage_sim::procs`). `.ci/run`
//! runs `cargo build --bins` first.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anchorage_console::ControlPlaneClient;
use anchorage_console::api::{MintCodeRequest, PairMethod, Permission, RequestState};
use anchorage_sim::procs::{Anchord, Proc, bins, command, find_in_path, free_port};
use serde_json::{Value, json};
use thirtyfour::common::config::WebDriverConfig;
use thirtyfour::error::WebDriverErrorInner;
use thirtyfour::{By, WebDriver};

/// Where Debian puts Chromium.
const CHROMIUM: &str = "/usr/bin/chromium";
/// Where Debian puts Firefox ESR.
const FIREFOX: &str = "/usr/bin/firefox-esr";

/// Firefox preferences: the same intent as Chromium's switches (no updates, telemetry or
/// background requests on a closed network).
const FIREFOX_PREFS: &[(&str, bool)] = &[
    ("app.update.auto", false),
    ("browser.shell.checkDefaultBrowser", false),
    ("datareporting.policy.dataSubmissionEnabled", false),
    ("network.captive-portal-service.enabled", false),
    ("network.connectivity-service.enabled", false),
    ("toolkit.telemetry.enabled", false),
    ("browser.safebrowsing.malware.enabled", false),
    ("browser.safebrowsing.phishing.enabled", false),
];

/// The browser the test drives: Chromium, or Firefox with `ANCHORAGE_BROWSER=firefox`.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Browser {
    Chromium,
    Firefox,
}

impl Browser {
    fn from_env() -> Browser {
        match std::env::var("ANCHORAGE_BROWSER").as_deref() {
            Ok("firefox") => Browser::Firefox,
            Ok("" | "chromium") | Err(_) => Browser::Chromium,
            Ok(other) => panic!("ANCHORAGE_BROWSER={other:?}: expected chromium or firefox"),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Browser::Chromium => "chromium",
            Browser::Firefox => "firefox",
        }
    }

    fn binary(self) -> &'static str {
        match self {
            Browser::Chromium => CHROMIUM,
            Browser::Firefox => FIREFOX,
        }
    }

    fn driver(self) -> &'static str {
        match self {
            Browser::Chromium => "chromedriver",
            Browser::Firefox => "geckodriver",
        }
    }

    /// How to get both.
    fn install_hint(self) -> &'static str {
        match self {
            Browser::Chromium => "apt-get install chromium chromium-driver",
            Browser::Firefox => "apt-get install firefox-esr; cargo install geckodriver",
        }
    }

    fn driver_command(self, driver: &Path, port: u16) -> Command {
        let mut cmd = Command::new(driver);
        match self {
            Browser::Chromium => cmd.arg(format!("--port={port}")),
            Browser::Firefox => cmd.args(["--port", &port.to_string()]),
        };
        cmd
    }

    /// New-session capabilities (what goes under `alwaysMatch`): headless, a fresh profile in
    /// `profile`.
    fn capabilities(self, profile: &Path) -> serde_json::Map<String, Value> {
        let always = match self {
            Browser::Chromium => {
                let mut args: Vec<String> = CHROMIUM_ARGS.iter().map(|a| a.to_string()).collect();
                args.push(format!("--user-data-dir={}", profile.display()));
                args.push("--window-size=1280,900".into());
                json!({
                    "browserName": "chrome",
                    "goog:chromeOptions": { "binary": CHROMIUM, "args": args },
                })
            }
            Browser::Firefox => {
                std::fs::create_dir_all(profile).unwrap();
                let prefs: serde_json::Map<String, Value> = FIREFOX_PREFS
                    .iter()
                    .map(|(k, v)| (k.to_string(), Value::Bool(*v)))
                    .collect();
                json!({
                    "browserName": "firefox",
                    "moz:firefoxOptions": {
                        "binary": FIREFOX,
                        "args": ["-headless", "-profile", profile.display().to_string()],
                        "prefs": prefs,
                    },
                })
            }
        };
        match always {
            Value::Object(map) => map,
            _ => unreachable!("built as an object above"),
        }
    }
}

/// Chromium's switches: the issue's list (no background traffic on a closed network, no GPU, no
/// sandbox as root), a fresh profile and a fixed window for a stable screenshot.
const CHROMIUM_ARGS: &[&str] = &[
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
];

/// How long a step may take before the test fails and says which one.
const STEP: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_console_in_a_headless_browser() {
    let browser = Browser::from_env();
    let Some(driver) = browser_available(browser) else {
        return;
    };
    let started = Instant::now();
    bins(); // a build, if one is needed, counts as setup
    let tmp = tempfile::tempdir().unwrap();

    let anchor_dir = tmp.path().join("anchor");
    let anchor = start_anchor(&anchor_dir, "127.0.0.1:0", "127.0.0.1:0", tmp.path()).await;
    let quic = anchor.ready.quic.to_string();
    let console = anchor.ready.console.clone();
    let owner_token = anchor.owner_token();
    println!("anchord: quic {quic}, console {console}");
    let client = ControlPlaneClient::new(&console, owner_token.clone()).unwrap();
    let me = client.whoami().await.unwrap();
    assert_eq!(me.permissions.len(), Permission::ALL.len(), "{me:?}");

    // The first node, paired outside the page, then running.
    let node1_dir = tmp.path().join("node1");
    let node1 = pair_with_client(&client, &quic, &node1_dir, "web-node-one", tmp.path()).await;
    let _node1_run = Proc::spawn(
        "anchor-node run (one)",
        command(&bins().anchor_node, tmp.path()).args(["run", "--state-dir", path_str(&node1_dir)]),
    );

    // The browser.
    let driver_port = free_port();
    let _driver = Proc::spawn(
        browser.driver(),
        &mut browser.driver_command(&driver, driver_port),
    );
    let profile = tmp.path().join(format!("{}-profile", browser.name()));
    let mut wd = Page::start(browser, driver_port, &profile).await;

    let setup = started.elapsed();
    let page = Instant::now();
    let step = |name: &str| println!("[{:5.1} s] {name}", page.elapsed().as_secs_f64());
    step("sign in");
    sign_in(&wd, &console, &owner_token).await;
    step("see the first node online");
    see_node_online(&wd, &node1).await;
    step("the mesh section renders");
    mesh_section_renders(&wd).await;
    step("labels: shown, and found by the search");
    labels_show_and_filter(&wd, &client, &node1).await;
    step("invoke system.health");
    invoke_system_health(&wd, &node1).await;
    step("edit labels on the device page");
    edit_labels(&wd, &client, &node1).await;
    step("mint a QR code");
    show_a_qr_code(&wd).await;
    step("mint a PIN, pair the second node, approve it");
    let node2 = pair_second_node_from_the_page(&wd, &quic, tmp.path()).await;
    step("run a batch on a selector, follow it, find it in the list");
    batch_from_the_inventory(&wd, &client, &node1, &node2).await;
    step("revoke the second node");
    revoke_from_the_page(&wd, &node2).await;
    step("tokens and permissions");
    tokens_and_permissions(&wd, &client, &console, &owner_token).await;
    step("a scoped token with an expiry");
    scoped_token(&wd, &console).await;
    step("a third node, run then stopped: offline and first; sortable columns");
    let node3_dir = tmp.path().join("node3");
    let node3 = pair_with_client(&client, &quic, &node3_dir, "web-node-zed", tmp.path()).await;
    let node3_run = Proc::spawn(
        "anchor-node run (three)",
        command(&bins().anchor_node, tmp.path()).args(["run", "--state-dir", path_str(&node3_dir)]),
    );
    problems_first_and_sorting(&wd, &node1, &node3, &node3_run).await;
    step("a device's history charts");
    history_charts(&wd, &node1).await;
    step("the audit log, filtered");
    audit_view(&wd, &node3).await;
    step("invoke on two selected rows");
    bulk_invoke(&wd, &node1, &node3).await;
    step("restart the anchor: the page reconnects");
    let _anchor = restart_anchor(
        &wd,
        anchor,
        &anchor_dir,
        &quic,
        &console,
        &node1,
        tmp.path(),
    )
    .await;
    step("narrow screen");
    narrow_screen(&wd).await;
    step("CSP and origins");
    page_hygiene(&wd, &console).await;
    step("screenshot");
    screenshot_inventory(&wd, &node1, &node2).await;

    wd.quit().await;
    println!(
        "browser test: setup {:.1} s, page {:.1} s, total {:.1} s",
        setup.as_secs_f64(),
        page.elapsed().as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
}

// ---------------------------------------------------------------------------------------------
// Steps

/// Starts `anchord` (with a short heartbeat, so presence shows quickly, a history sample every
/// second, and JSON logs) and
/// waits for its `anchor ready` log line.
async fn start_anchor(data_dir: &Path, listen: &str, console: &str, cwd: &Path) -> Anchord {
    Anchord::start_async(
        data_dir,
        listen,
        console,
        &[
            "--heartbeat-interval",
            "1s",
            "--log-format",
            "json",
            // The hidden test switch: a history sample a second, so charts fill quickly.
            "--history-interval",
            "1s",
        ],
        cwd,
    )
    .await
}

/// The inventory's row order, top to bottom (device ids).
const ROW_ORDER: &str =
    "return [...document.querySelectorAll('#inventory tbody tr')].map((r) => r.dataset.deviceId)";

/// Problems first: a node that stopped shows offline on top although its name sorts last; a
/// click on a header sorts by that column (an arrow and `aria-sort` say so), a second reverses.
async fn problems_first_and_sorting(wd: &Page, node1: &NodeInfo, node3: &NodeInfo, run: &Proc) {
    wd.click("[data-nav=inventory]").await;
    let presence_of = "const r = document.querySelector(`#inventory tr[data-device-id=\"${arguments[0]}\"]`); \
         const p = r && r.querySelector('[data-kind=presence]'); return p && p.textContent";
    wd.wait_js_args(
        "the third node online",
        &format!("return ((() => {{ {presence_of} }})() === 'online') || null"),
        json!([node3.device_id]),
        &[("order", ROW_ORDER)],
    )
    .await;
    run.terminate();
    let order = wd
        .wait_js_args(
            "the stopped node offline, on top",
            &format!(
                "const p = (() => {{ {presence_of} }})(); \
                 const rows = [...document.querySelectorAll('#inventory tbody tr')].map((r) => r.dataset.deviceId); \
                 return (p === 'offline' && rows[0] === arguments[0]) ? rows : null"
            ),
            json!([node3.device_id]),
            &[("order", ROW_ORDER)],
        )
        .await;
    assert!(order.as_array().unwrap().len() >= 3, "{order}");
    let unsorted = wd
        .js(
            "return [...document.querySelectorAll('#inventory th[data-sort]')].every((t) => t.getAttribute('aria-sort') === 'none')",
            json!([]),
        )
        .await;
    assert_eq!(unsorted, true, "no column is sorted by default");

    let sorted = |dir: &str, first: &str| {
        format!(
            "const th = document.querySelector('#inventory th[data-sort=name]'); \
             const rows = [...document.querySelectorAll('#inventory tbody tr')].map((r) => r.dataset.deviceId); \
             return (th && th.getAttribute('aria-sort') === '{dir}' && rows[0] === '{first}') \
               ? [th.textContent, rows] : null"
        )
    };
    wd.click("#inventory th[data-sort=name] button").await;
    let asc = wd
        .wait_js_args(
            "sorted by name, ascending",
            &sorted("ascending", &node1.device_id),
            json!([]),
            &[("order", ROW_ORDER)],
        )
        .await;
    assert!(asc[0].as_str().unwrap().contains('▲'), "{asc}");
    assert_ne!(asc[1], order, "the order changed");
    wd.click("#inventory th[data-sort=name] button").await;
    let desc = wd
        .wait_js_args(
            "sorted by name, descending",
            &sorted("descending", &node3.device_id),
            json!([]),
            &[("order", ROW_ORDER)],
        )
        .await;
    assert!(desc[0].as_str().unwrap().contains('▼'), "{desc}");
    wd.click("#sort-reset").await;
    wd.wait_js(
        "problems first again",
        "return [...document.querySelectorAll('#inventory th[data-sort]')].every((t) => t.getAttribute('aria-sort') === 'none') || null",
    )
    .await;
}

/// The device page draws RTT, loss and heartbeat age over the last hours, with points, and a
/// presence timeline.
async fn history_charts(wd: &Page, node: &NodeInfo) {
    wd.click(&format!(
        "#inventory tr[data-device-id=\"{}\"] a.device-name",
        node.device_id
    ))
    .await;
    let points = wd
        .wait_js_args(
            "an RTT chart with points",
            "const n = document.querySelectorAll('#history-rtt svg circle.pt').length; \
             const id = document.getElementById('device-id'); \
             return (id && id.textContent === arguments[0] && n >= 2) ? n : null",
            json!([node.device_id]),
            &[(
                "history",
                "const h = document.getElementById('device-history'); return h && h.innerText",
            )],
        )
        .await;
    assert!(points.as_u64().unwrap() >= 2, "{points}");
    let other = wd
        .js(
            "return ['history-loss', 'history-heartbeat'].map((id) => document.querySelectorAll(`#${id} svg circle.pt`).length)",
            json!([]),
        )
        .await;
    assert!(
        other
            .as_array()
            .unwrap()
            .iter()
            .all(|n| n.as_u64().unwrap() >= 1),
        "loss and heartbeat charts have points: {other}"
    );
    let timeline = wd
        .js(
            "return [document.querySelectorAll('#history-presence svg rect.band').length, \
                     [...document.querySelectorAll('#history-presence li')].map((l) => l.dataset.presence)]",
            json!([]),
        )
        .await;
    assert!(timeline[0].as_u64().unwrap() >= 1, "{timeline}");
    assert!(
        timeline[1].as_array().unwrap().contains(&json!("online")),
        "{timeline}"
    );
    wd.shot("device-history").await;
}

/// The audit tab lists the pairings; a filter narrows the list.
async fn audit_view(wd: &Page, node: &NodeInfo) {
    wd.click("[data-nav=audit]").await;
    let rows =
        "return [...document.querySelectorAll('#audit tbody tr')].map((r) => r.dataset.action)";
    let all = wd
        .wait_js_args(
            "the pairings in the audit log",
            "const rows = [...document.querySelectorAll('#audit tbody tr')].map((r) => r.dataset.action); \
             return rows.filter((a) => a === 'pairing.approve').length >= 3 ? rows : null",
            json!([]),
            &[("rows", rows)],
        )
        .await;
    let all = all.as_array().unwrap().len();
    wd.type_into("#audit-action", "token.create").await;
    let tokens = wd
        .wait_js_args(
            "only token creations",
            "const rows = [...document.querySelectorAll('#audit tbody tr')].map((r) => r.dataset.action); \
             return (rows.length && rows.every((a) => a === 'token.create')) ? rows : null",
            json!([]),
            &[("rows", rows)],
        )
        .await;
    assert!(tokens.as_array().unwrap().len() < all, "{tokens}");
    wd.click("#audit-clear").await;
    // One device: its pairing (the approval's detail is the device id).
    wd.type_into("#audit-target", &node.device_id).await;
    let one = wd
        .wait_js_args(
            "the third node's entries",
            "const rows = [...document.querySelectorAll('#audit tbody tr')].map((r) => r.dataset.action); \
             return (rows.length && rows.length < arguments[0] && rows.includes('pairing.approve')) ? rows : null",
            json!([all]),
            &[("rows", rows)],
        )
        .await;
    assert!(!one.as_array().unwrap().is_empty());
    wd.click("#audit-clear").await;
}

/// Tick two rows, invoke on them: a batch of exactly those two.
async fn bulk_invoke(wd: &Page, node1: &NodeInfo, node3: &NodeInfo) {
    wd.click("[data-nav=inventory]").await;
    for n in [node1, node3] {
        let checkbox = format!(
            "#inventory tr[data-device-id=\"{}\"] input[data-select]",
            n.device_id
        );
        wd.wait_js_args(
            "a row's checkbox",
            "return !!document.querySelector(arguments[0]) || null",
            json!([checkbox]),
            &[],
        )
        .await;
        wd.click(&checkbox).await;
    }
    let count = wd
        .wait_js(
            "two rows selected",
            "const b = document.getElementById('bulk-bar'); \
             return (!b.hidden && document.getElementById('bulk-count').textContent === '2 selected') \
               ? document.getElementById('bulk-invoke').textContent : null",
        )
        .await;
    assert_eq!(count, "Invoke on selected");
    wd.clear("#bulk-capability").await;
    wd.type_into("#bulk-capability", "system.health").await;
    wd.click("#bulk-invoke").await;
    let devices = wd
        .wait_js(
            "the batch page with the two devices",
            "const ids = [...document.querySelectorAll('#batch-invocations tr[data-device-id]')].map((r) => r.dataset.deviceId); \
             return (location.hash.startsWith('#/batch/') && ids.length === 2) ? ids : null",
        )
        .await;
    let devices = devices.as_array().unwrap();
    assert!(devices.contains(&json!(node1.device_id)), "{devices:?}");
    assert!(devices.contains(&json!(node3.device_id)), "{devices:?}");
    let selected = wd
        .js(
            "return document.getElementById('bulk-bar').hidden",
            json!([]),
        )
        .await;
    assert_eq!(selected, true, "the selection is cleared after the batch");
}

async fn sign_in(wd: &Page, console: &str, token: &str) {
    wd.goto(&format!("{console}/")).await;
    wd.wait_js(
        "the sign-in form",
        "return !document.getElementById('view-signin').hidden || null",
    )
    .await;
    // Record CSP violations from here on (the page is one document: hash routes, no reloads).
    wd.js(
        "window.__csp = []; document.addEventListener('securitypolicyviolation', \
         e => window.__csp.push(e.violatedDirective + ' ' + e.blockedURI));",
        json!([]),
    )
    .await;
    wd.type_into("#signin-token", "not-a-token").await;
    wd.click("#signin-submit").await;
    let refused = wd
        .wait_js(
            "a refused token to be reported",
            "const e = document.getElementById('signin-error'); return (!e.hidden && e.textContent) || null",
        )
        .await;
    assert!(
        refused.as_str().unwrap().contains("does not know"),
        "{refused}"
    );
    wd.clear("#signin-token").await;
    wd.type_into("#signin-token", token).await;
    wd.click("#signin-submit").await;
    wd.wait_js(
        "the inventory after signing in",
        "return (!document.getElementById('view-inventory').hidden \
          && document.getElementById('whoami').textContent) || null",
    )
    .await;
    let where_ = wd
        .js(
            "return [location.href, sessionStorage.getItem('anchorage.console.token'), \
                     document.getElementById('signin-token').value]",
            json!([]),
        )
        .await;
    assert!(
        !where_[0].as_str().unwrap().contains(token),
        "token in the URL"
    );
    assert_eq!(where_[1], token, "the token is kept in sessionStorage");
    assert_eq!(where_[2], "", "the token field is cleared");
}

async fn see_node_online(wd: &Page, node: &NodeInfo) {
    let id = &node.device_id;
    let presence = wd
        .wait_js_args(
            &format!("{} to show online in the inventory", node.name),
            "const r = document.querySelector(`#inventory tr[data-device-id=\"${arguments[0]}\"]`); \
             const p = r && r.querySelector('[data-kind=presence]'); \
             return (p && p.textContent === 'online') ? r.innerText : null",
            json!([id]),
            &[
                ("row", "const r = document.querySelector(`#inventory tr[data-device-id=\"${arguments[0]}\"]`); return r && r.innerText"),
                ("notice", "return document.getElementById('inventory-notice').innerText"),
            ],
        )
        .await;
    let row = presence.as_str().unwrap();
    assert!(row.contains(&node.name), "{row}");
    assert!(row.contains("trusted"), "{row}");
    let online = wd
        .js(
            "return document.querySelector('[data-counter=online] .count').textContent",
            json!([]),
        )
        .await;
    assert_eq!(online, "1", "the summary counts the online node");
}

/// The inventory's Mesh section loads `GET /mesh` and shows its links, or says there are none
/// (one node, no peers: nothing reported).
async fn mesh_section_renders(wd: &Page) {
    let text = wd
        .wait_js(
            "the Mesh section to render",
            "const m = document.getElementById('mesh'); \
             const l = document.getElementById('mesh-links'); \
             return (m && l && (l.querySelector('table') || l.querySelector('.empty'))) ? m.innerText : null",
        )
        .await;
    let text = text.as_str().unwrap();
    assert!(text.contains("Mesh"), "{text}");
    assert!(
        text.contains("No peer connections reported.") || text.contains("Path"),
        "{text}"
    );
    assert!(!text.contains("cannot be read"), "{text}");
}

async fn labels_show_and_filter(wd: &Page, client: &ControlPlaneClient, node: &NodeInfo) {
    let mut req = anchorage_console::api::LabelRequest::default();
    req.set.insert("site".into(), "lab".into());
    client.label(&node.device_id, &req).await.unwrap();
    // The `device.labels` event makes the page re-read the inventory.
    let chips = wd
        .wait_js_args(
            "the label to show on the device's row",
            "const r = document.querySelector(`#inventory tr[data-device-id=\"${arguments[0]}\"]`); \
             const c = r && r.querySelector('.labels'); \
             return c ? c.innerText : null",
            json!([node.device_id]),
            &[],
        )
        .await;
    assert!(chips.as_str().unwrap().contains("site=lab"), "{chips}");
    wd.type_into("#filter-text", "site=elsewhere").await;
    wd.wait_js(
        "no row to match another site",
        "return document.querySelectorAll('#inventory tbody tr').length === 0 || null",
    )
    .await;
    wd.clear("#filter-text").await;
    // The anchor searches (GET /inventory?q=): the rows come once typing pauses.
    wd.type_into("#filter-text", "site=lab").await;
    let kept = wd
        .wait_js_args(
            "the labelled device to match its label",
            "const rows = [...document.querySelectorAll('#inventory tbody tr')].map((r) => r.dataset.deviceId); \
             return (rows.length === 1 && rows[0] === arguments[0]) ? rows.length : null",
            json!([node.device_id]),
            &[],
        )
        .await;
    assert_eq!(kept, 1, "the labelled device matches its label");
    wd.click("#filter-clear").await;
}

/// On the device page (where the invoke step left it): set one label, remove another.
async fn edit_labels(wd: &Page, client: &ControlPlaneClient, node: &NodeInfo) {
    wd.type_into("#label-changes", "role=camera site-").await;
    wd.click("#action-label").await;
    let shown = wd
        .wait_js(
            "the device's labels to show the change",
            "const dd = [...document.querySelectorAll('.facts dt')] \
               .find((dt) => dt.textContent === 'Labels'); \
             const t = dd && dd.nextElementSibling.textContent; \
             return (t && t.includes('role=camera') && !t.includes('site=lab')) ? t : null",
        )
        .await;
    assert!(
        shown.as_str().unwrap().contains("node.anchorage/platform"),
        "{shown}"
    );
    let device = client.device(&node.device_id).await.unwrap();
    assert_eq!(
        device.labels.get("role").map(String::as_str),
        Some("camera")
    );
    assert!(!device.labels.contains_key("site"), "{:?}", device.labels);
}

async fn invoke_system_health(wd: &Page, node: &NodeInfo) {
    let id = &node.device_id;
    wd.click(&format!(
        "#inventory tr[data-device-id=\"{id}\"] a.device-name"
    ))
    .await;
    wd.wait_js_args(
        "the device page with its capabilities",
        "return (document.getElementById('device-id') \
           && document.getElementById('device-id').textContent === arguments[0] \
           && document.querySelector('#invoke-capability option[value=\"system.health\"]')) ? true : null",
        json!([id]),
        &[],
    )
    .await;
    wd.click("#invoke-capability option[value=\"system.health\"]")
        .await;
    wd.clear("#invoke-input").await;
    wd.type_into("#invoke-input", "{}").await;
    wd.click("#invoke-submit").await;
    let result = wd
        .wait_js_args(
            "the result of system.health",
            "const r = document.querySelector('#invoke-result [data-state]'); \
             if (!r || r.dataset.state === 'queued' || r.dataset.state === 'dispatched') return null; \
             const o = document.getElementById('invoke-output'); \
             return [r.dataset.state, r.dataset.invocationId, o ? o.textContent : null]",
            json!([]),
            &[(
                "error",
                "const e = document.getElementById('invoke-error'); return e && e.textContent",
            )],
        )
        .await;
    assert_eq!(result[0], "succeeded", "{result}");
    let output: Value = serde_json::from_str(result[2].as_str().unwrap()).unwrap();
    assert_eq!(output["status"], "ok", "{output}");
    // The recent invocations list picks it up by itself.
    wd.wait_js_args(
        "the invocation in the recent list",
        "const r = document.querySelector(`#invocations tr[data-invocation-id=\"${arguments[0]}\"]`); \
         return r ? r.innerText : null",
        json!([result[1]]),
        &[],
    )
    .await;
    wd.shot("device").await;
}

async fn show_a_qr_code(wd: &Page) {
    wd.click("[data-nav=pairing]").await;
    wd.wait_js(
        "the pairing page",
        "return !document.getElementById('view-pairing').hidden || null",
    )
    .await;
    wd.click("#mint-method option[value=qr]").await;
    wd.click("#mint-submit").await;
    let qr = wd
        .wait_js(
            "the QR code image",
            "const i = document.getElementById('minted-qr'); \
             return (i && i.complete && i.naturalWidth > 0) ? [i.src, i.naturalWidth] : null",
        )
        .await;
    assert!(
        qr[0].as_str().unwrap().starts_with("blob:"),
        "the QR image is the anchor's SVG, fetched with the token: {qr}"
    );
}

async fn pair_second_node_from_the_page(wd: &Page, quic: &str, tmp: &Path) -> NodeInfo {
    wd.click("#mint-method option[value=pin]").await;
    wd.click("#mint-submit").await;
    let pin = wd
        .wait_js(
            "the PIN",
            "const p = document.getElementById('minted-code'); return p ? p.textContent : null",
        )
        .await;
    let pin = pin.as_str().unwrap().to_string();
    let large = wd
        .js(
            "return parseFloat(getComputedStyle(document.getElementById('minted-code')).fontSize)",
            json!([]),
        )
        .await;
    assert!(large.as_f64().unwrap() >= 30.0, "the PIN is shown large");

    let name = "web-node-two";
    let mut pairing = Proc::spawn(
        "anchor-node pair (two)",
        command(&bins().anchor_node, tmp).args([
            "pair",
            "--anchor",
            quic,
            "--code",
            &pin,
            "--state-dir",
            path_str(&tmp.join("node2")),
            "--name",
            name,
        ]),
    );
    let sas = pairing
        .wait_line_async(STEP, |line| {
            line.split_once("Check that the console shows this code: ")
                .map(|(_, sas)| sas.trim().to_string())
        })
        .await;
    // The request appears without a reload (event stream), with the same SAS.
    let row = wd
        .wait_js_args(
            "the pairing request in the page",
            "for (const r of document.querySelectorAll('#pending-requests tr[data-request-id]')) \
               if (r.innerText.includes(arguments[0])) \
                 return [r.dataset.requestId, r.dataset.deviceId, r.querySelector('.sas').textContent]; \
             return null",
            json!([name]),
            &[],
        )
        .await;
    let request_id = row[0].as_str().unwrap().to_string();
    let device_id = row[1].as_str().unwrap().to_string();
    assert_eq!(
        row[2],
        sas.as_str(),
        "the page shows the SAS the node shows"
    );
    wd.shot("pairing").await;
    wd.click(&format!(
        "#pending-requests tr[data-request-id=\"{request_id}\"] button.approve"
    ))
    .await;
    let status = pairing.wait_exit_async(STEP).await;
    assert!(status.success(), "anchor-node pair: {status}");
    let paired = pairing
        .wait_line_async(STEP, |line| {
            line.strip_prefix("Paired as ")
                .and_then(|rest| rest.split_whitespace().next())
                .map(str::to_string)
        })
        .await;
    assert_eq!(paired, device_id);
    wd.wait_js_args(
        "the request among the decisions",
        "const r = document.querySelector(`#decided-requests tr[data-request-id=\"${arguments[0]}\"]`); \
         const s = r && r.querySelector('[data-kind=req]'); \
         return (s && (s.textContent === 'approved' || s.textContent === 'completed')) ? s.textContent : null",
        json!([request_id]),
        &[],
    )
    .await;
    NodeInfo {
        device_id,
        name: name.to_string(),
    }
}

/// From the inventory: a selector that does not parse is refused with the anchor's reason; one
/// that matches both nodes offers "Run on 2 devices"; `system.health` runs with a 5 s deadline.
/// The first node (running) succeeds, the second (paired, never started) times out, and the
/// page shows the batch running with one of two finished, then done with those counts, then
/// lists it among the batches.
async fn batch_from_the_inventory(
    wd: &Page,
    client: &ControlPlaneClient,
    node1: &NodeInfo,
    node2: &NodeInfo,
) {
    // The first node has role=camera from its page (the label step); the second gets it here.
    let mut req = anchorage_console::api::LabelRequest::default();
    req.set.insert("role".into(), "camera".into());
    client.label(&node2.device_id, &req).await.unwrap();
    wd.click("[data-nav=inventory]").await;
    wd.wait_js_args(
        "both nodes in the inventory",
        "return [arguments[0], arguments[1]].every( \
           (id) => document.querySelector(`#inventory tr[data-device-id=\"${id}\"]`)) || null",
        json!([node1.device_id, node2.device_id]),
        &[],
    )
    .await;

    wd.type_into("#filter-selector", "role in (camera").await;
    let refused = wd
        .wait_js(
            "the selector to be refused",
            "const e = document.getElementById('filter-selector-error'); \
             return (!e.hidden && e.textContent) || null",
        )
        .await;
    let refused = refused.as_str().unwrap();
    assert!(refused.contains("does not parse"), "{refused}");
    assert!(
        refused.contains("at character"),
        "the anchor says where: {refused}"
    );
    assert_eq!(
        wd.js(
            "return document.getElementById('batch-submit').disabled",
            json!([])
        )
        .await,
        true,
        "nothing to run on a selector that does not parse"
    );

    wd.clear("#filter-selector").await;
    wd.type_into("#filter-selector", "role=camera").await;
    let offered = wd
        .wait_js_args(
            "the batch button to offer the two nodes",
            "const b = document.getElementById('batch-submit'); \
             const rows = [...document.querySelectorAll('#inventory tbody tr')].map((r) => r.dataset.deviceId); \
             return (!b.disabled && rows.length === 2 && rows.includes(arguments[0]) && rows.includes(arguments[1])) \
               ? b.textContent : null",
            json!([node1.device_id, node2.device_id]),
            &[(
                "button",
                "return document.getElementById('batch-submit').textContent",
            )],
        )
        .await;
    assert_eq!(offered, "Run on 2 devices");

    wd.click("#batch-open").await;
    wd.type_into("#batch-capability", "system.health").await;
    wd.clear("#batch-timeout").await;
    wd.type_into("#batch-timeout", "5").await;
    wd.click("#batch-submit").await;
    let status = "const s = document.getElementById('batch-status'); return s && s.textContent";
    // One finished (the running node), one waiting for a node that never comes.
    let running = wd
        .wait_js(
            "the batch to show one of two finished while it runs",
            "const s = document.getElementById('batch-status'); \
             return (s && location.hash.startsWith('#/batch/') && s.textContent.includes('1 of 2')) \
               ? s.textContent : null",
        )
        .await;
    assert!(
        running.as_str().unwrap().starts_with("Running"),
        "{running}"
    );
    let done = wd
        .wait_js_args(
            "the batch to finish",
            "const s = document.getElementById('batch-status'); \
             return (s && s.textContent.startsWith('Done')) ? s.textContent : null",
            json!([]),
            &[("status", status)],
        )
        .await;
    assert!(done.as_str().unwrap().contains("2 of 2"), "{done}");
    let counts = wd
        .js(
            "const n = (k) => document.querySelector(`#batch-counts [data-count=${k}] .count`).textContent; \
             return ['total', 'succeeded', 'failed', 'timed_out', 'rejected', 'pending'].map(n)",
            json!([]),
        )
        .await;
    assert_eq!(
        counts,
        json!(["2", "1", "0", "1", "0", "0"]),
        "total, succeeded, failed, timed out, rejected, pending"
    );
    let row = |id: &str| {
        format!(
            "const r = document.querySelector('#batch-invocations tr[data-device-id=\"{id}\"]'); \
             return r && [r.querySelector('[data-kind=inv]').textContent, \
                          r.querySelector('.batch-result').textContent, r.innerText]"
        )
    };
    let one = wd.js(&row(&node1.device_id), json!([])).await;
    assert_eq!(one[0], "succeeded", "{one}");
    assert!(
        one[1].as_str().unwrap().contains(r#""status":"ok""#),
        "the health output: {one}"
    );
    assert!(one[2].as_str().unwrap().contains(&node1.name), "{one}");
    let two = wd.js(&row(&node2.device_id), json!([])).await;
    assert_eq!(two[0], "timed out", "{two}");
    assert!(two[2].as_str().unwrap().contains(&node2.name), "{two}");
    let batch_id = wd
        .js(
            "return decodeURIComponent(location.hash.slice('#/batch/'.length))",
            json!([]),
        )
        .await;
    wd.shot("batch").await;

    wd.click("[data-nav=batches]").await;
    let listed = wd
        .wait_js_args(
            "the batch in the batches list",
            "const r = document.querySelector(`#batches tr[data-batch-id=\"${arguments[0]}\"]`); \
             return r ? r.innerText : null",
            json!([batch_id]),
            &[],
        )
        .await;
    let listed = listed.as_str().unwrap();
    for text in [
        "system.health",
        "role=camera",
        "2/2",
        "1 succeeded",
        "1 timed out",
        "owner",
    ] {
        assert!(
            listed.contains(text),
            "{text:?} in the batch's row: {listed}"
        );
    }
    wd.shot("batches").await;
    // Its page again, from the list.
    wd.click(&format!(
        "#batches tr[data-batch-id=\"{}\"] a.batch-link",
        batch_id.as_str().unwrap()
    ))
    .await;
    wd.wait_js(
        "the batch's page from the list",
        "const s = document.getElementById('batch-status'); \
         return (s && s.textContent.startsWith('Done')) || null",
    )
    .await;
    wd.click("[data-nav=inventory]").await;
    wd.click("#filter-clear").await;
}

async fn revoke_from_the_page(wd: &Page, node: &NodeInfo) {
    let id = &node.device_id;
    wd.click("[data-nav=inventory]").await;
    wd.wait_js_args(
        "the second node, trusted, in the inventory",
        "const r = document.querySelector(`#inventory tr[data-device-id=\"${arguments[0]}\"]`); \
         const t = r && r.querySelector('[data-kind=trust]'); \
         return (t && t.textContent === 'trusted') || null",
        json!([id]),
        &[],
    )
    .await;
    wd.click(&format!(
        "#inventory tr[data-device-id=\"{id}\"] a.device-name"
    ))
    .await;
    wd.wait_js_args(
        "the revoke button",
        "const b = document.getElementById('action-revoke'); \
         return (b && !b.disabled && document.getElementById('device-id').textContent === arguments[0]) || null",
        json!([id]),
        &[],
    )
    .await;
    wd.click("#action-revoke").await;
    wd.wait_js(
        "the confirmation",
        "return document.getElementById('confirm-dialog').open || null",
    )
    .await;
    // Cancelling changes nothing.
    wd.click("#confirm-cancel").await;
    wd.wait_js(
        "the dialog to close",
        "return !document.getElementById('confirm-dialog').open || null",
    )
    .await;
    let trust = wd
        .js(
            "return document.querySelector('.device-head [data-kind=trust]').textContent",
            json!([]),
        )
        .await;
    assert_eq!(trust, "trusted");
    wd.click("#action-revoke").await;
    wd.wait_js(
        "the confirmation",
        "return document.getElementById('confirm-dialog').open || null",
    )
    .await;
    wd.type_into("#confirm-reason", "browser test").await;
    wd.click("#confirm-ok").await;
    wd.wait_js(
        "the device page to show revoked",
        "const t = document.querySelector('.device-head [data-kind=trust]'); \
         return (t && t.textContent === 'revoked') || null",
    )
    .await;
    assert_eq!(
        wd.js(
            "return document.getElementById('action-revoke').disabled",
            json!([])
        )
        .await,
        true
    );
    wd.click("[data-nav=inventory]").await;
    wd.wait_js_args(
        "the inventory to show the second node revoked",
        "const r = document.querySelector(`#inventory tr[data-device-id=\"${arguments[0]}\"]`); \
         const t = r && r.querySelector('[data-kind=trust]'); \
         return (t && t.textContent === 'revoked') || null",
        json!([id]),
        &[],
    )
    .await;
}

async fn tokens_and_permissions(
    wd: &Page,
    client: &ControlPlaneClient,
    console: &str,
    owner_token: &str,
) {
    wd.click("[data-nav=tokens]").await;
    wd.wait_js(
        "the token list",
        "return document.querySelector('#tokens tbody tr') ? true : null",
    )
    .await;
    wd.type_into("#token-name", "viewer").await;
    // observability.read is checked by default; nothing else.
    wd.click("#token-submit").await;
    let secret = wd
        .wait_js(
            "the new token's secret",
            "const s = document.getElementById('created-secret'); return s ? s.textContent : null",
        )
        .await;
    let secret = secret.as_str().unwrap().to_string();
    wd.shot("tokens").await;
    let viewer = ControlPlaneClient::new(console, secret.clone())
        .unwrap()
        .whoami()
        .await
        .unwrap();
    assert_eq!(viewer.name, "viewer");
    assert_eq!(viewer.permissions, [Permission::ObservabilityRead]);
    wd.wait_js_args(
        "the new token in the list",
        "return document.querySelector(`#tokens tr[data-token-id=\"${arguments[0]}\"]`) ? true : null",
        json!([viewer.token_id]),
        &[],
    )
    .await;

    // Signed in as the viewer, the page offers no action the token lacks.
    wd.click("#signout").await;
    wd.wait_js(
        "the sign-in form",
        "return !document.getElementById('view-signin').hidden || null",
    )
    .await;
    assert_eq!(
        wd.js("return sessionStorage.length", json!([])).await,
        0,
        "signing out forgets the token"
    );
    wd.type_into("#signin-token", &secret).await;
    wd.click("#signin-submit").await;
    wd.wait_js(
        "the inventory as the viewer",
        "return document.querySelector('#inventory tbody tr') ? true : null",
    )
    .await;
    let hidden = wd
        .js(
            "return [document.querySelector('[data-nav=tokens]').hidden, \
                     document.getElementById('pairing-mint').hidden]",
            json!([]),
        )
        .await;
    assert_eq!(hidden, json!([true, true]), "tokens tab and minting hidden");
    wd.click("#inventory tbody tr a.device-name").await;
    wd.wait_js(
        "a device page as the viewer",
        "return document.getElementById('device-name') ? true : null",
    )
    .await;
    let actions = wd
        .js(
            "return ['action-revoke', 'action-rotate', 'action-remove', 'invoke-form'] \
               .filter(id => document.getElementById(id))",
            json!([]),
        )
        .await;
    assert_eq!(
        actions,
        json!([]),
        "the viewer sees no trust or invoke action"
    );
    // And the API refuses them anyway.
    let err = ControlPlaneClient::new(console, secret.clone())
        .unwrap()
        .mint_code(MintCodeRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(403));

    // Back as the owner: revoke the viewer from the page.
    wd.click("#signout").await;
    wd.type_into("#signin-token", owner_token).await;
    wd.click("#signin-submit").await;
    wd.wait_js(
        "the tokens tab as the owner",
        "return !document.querySelector('[data-nav=tokens]').hidden || null",
    )
    .await;
    wd.click("[data-nav=tokens]").await;
    let revoke = format!(
        "#tokens tr[data-token-id=\"{}\"] button.danger",
        viewer.token_id
    );
    wd.wait_js_args(
        "the viewer's revoke button",
        "return document.querySelector(arguments[0]) ? true : null",
        json!([revoke]),
        &[],
    )
    .await;
    wd.click(&revoke).await;
    wd.wait_js(
        "the confirmation",
        "return document.getElementById('confirm-dialog').open || null",
    )
    .await;
    wd.click("#confirm-ok").await;
    wd.wait_js_args(
        "the viewer token to show revoked",
        "const r = document.querySelector(`#tokens tr[data-token-id=\"${arguments[0]}\"]`); \
         const s = r && r.querySelector('[data-kind=token]'); \
         return (s && s.textContent === 'revoked') || null",
        json!([viewer.token_id]),
        &[],
    )
    .await;
    let err = ControlPlaneClient::new(console, secret)
        .unwrap()
        .whoami()
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(401));
    // The owner still works.
    client.whoami().await.unwrap();
}

/// From the tokens page: a limited token cannot carry tokens.manage (the form says so); one
/// limited to `site=lab` and `system.*`, expiring in 7 days, is created and listed with those
/// limits, its expiry, and no use until its secret is used.
async fn scoped_token(wd: &Page, console: &str) {
    wd.click("[data-nav=tokens]").await;
    wd.wait_js(
        "the token list",
        "return document.querySelector('#tokens tbody tr') ? true : null",
    )
    .await;
    wd.type_into("#token-name", "lab-runner").await;
    wd.click("#token-form input[value=\"nodes.invoke\"]").await;
    wd.type_into("#token-selector", "site=lab").await;
    wd.type_into("#token-capabilities", "system.*").await;
    wd.type_into("#token-expires", "7").await;
    wd.click("#token-form input[value=\"tokens.manage\"]").await;
    wd.click("#token-submit").await;
    let refused = wd
        .wait_js(
            "the form to refuse tokens.manage on a limited token",
            "const e = document.getElementById('token-form-error'); return (!e.hidden && e.textContent) || null",
        )
        .await;
    assert!(
        refused.as_str().unwrap().contains("tokens.manage"),
        "{refused}"
    );
    wd.click("#token-form input[value=\"tokens.manage\"]").await;
    wd.click("#token-submit").await;
    let created = wd
        .wait_js(
            "the new token's secret and limits",
            "const s = document.getElementById('created-secret'); \
             const l = document.getElementById('created-limits'); \
             return (s && l) ? [s.textContent, l.textContent] : null",
        )
        .await;
    let secret = created[0].as_str().unwrap().to_string();
    let limits = created[1].as_str().unwrap();
    assert!(
        limits.contains("devices matching site=lab") && limits.contains("capabilities system.*"),
        "{limits}"
    );
    assert!(limits.contains("It expires"), "{limits}");
    let runner = ControlPlaneClient::new(console, secret).unwrap();
    let row = "const r = [...document.querySelectorAll('#tokens tbody tr')] \
                 .find((r) => r.cells[0].textContent.startsWith('lab-runner')); \
               return r ? [r.dataset.tokenId, r.querySelector('.token-limits').innerText, \
                           r.querySelector('.token-expires').textContent, \
                           r.querySelector('.token-used').textContent, \
                           r.querySelector('[data-kind=token]').textContent, \
                           r.cells[2].innerText] : null";
    let listed = wd.wait_js("the limited token in the list", row).await;
    assert!(listed[1].as_str().unwrap().contains("site=lab"), "{listed}");
    assert!(listed[1].as_str().unwrap().contains("system.*"), "{listed}");
    assert_eq!(listed[2], "in 7 d", "{listed}");
    assert_eq!(listed[3], "never", "not used yet: {listed}");
    assert_eq!(listed[4], "active", "{listed}");
    let perms = listed[5].as_str().unwrap();
    assert!(
        perms.contains("observability.read")
            && perms.contains("nodes.invoke")
            && !perms.contains("tokens.manage"),
        "{listed}"
    );
    // What the anchor made of the form.
    let me = runner.whoami().await.unwrap();
    assert_eq!(me.token_id, listed[0].as_str().unwrap());
    assert_eq!(me.scope.selector.to_string(), "site=lab");
    assert_eq!(me.scope.capabilities, ["system.*"]);
    // Used now: the list says so once it is read again.
    wd.click("[data-nav=inventory]").await;
    wd.click("[data-nav=tokens]").await;
    let used = wd
        .wait_js(
            "the token's last use",
            "const r = [...document.querySelectorAll('#tokens tbody tr')] \
               .find((r) => r.cells[0].textContent.startsWith('lab-runner')); \
             const u = r && r.querySelector('.token-used').textContent; \
             return (u && u !== 'never') ? u : null",
        )
        .await;
    assert!(
        used.as_str().unwrap().ends_with("ago") || used == "now",
        "{used}"
    );
    wd.js(
        "document.getElementById('tokens').scrollIntoView()",
        json!([]),
    )
    .await;
    wd.shot("tokens-scoped").await;
}

/// Stops the anchor cleanly (its event streams end), sees the page say it is reconnecting,
/// starts it again on the same addresses, and sees the page live again with the node back.
async fn restart_anchor(
    wd: &Page,
    anchor: Anchord,
    data_dir: &Path,
    quic: &str,
    console: &str,
    node: &NodeInfo,
    cwd: &Path,
) -> Anchord {
    wd.click("[data-nav=inventory]").await;
    wd.wait_js(
        "the live event stream",
        "return document.getElementById('stream-status').classList.contains('live') || null",
    )
    .await;
    let mut anchor = anchor;
    anchor.proc.terminate();
    let status = anchor.proc.wait_exit_async(STEP).await;
    assert!(status.success(), "anchord stopped with {status}");
    drop(anchor);
    let down = wd
        .wait_js(
            "the page to notice the anchor is gone",
            "const s = document.getElementById('stream-status'); \
             return s.classList.contains('down') ? s.textContent : null",
        )
        .await;
    assert!(down.as_str().unwrap().contains("reconnecting"), "{down}");
    let console_addr = console.strip_prefix("http://").unwrap();
    let anchor = start_anchor(data_dir, quic, console_addr, cwd).await;
    wd.wait_js(
        "the page to reconnect",
        "return document.getElementById('stream-status').classList.contains('live') || null",
    )
    .await;
    wd.wait_js_args(
        "the node to show online again",
        "const r = document.querySelector(`#inventory tr[data-device-id=\"${arguments[0]}\"]`); \
         const p = r && r.querySelector('[data-kind=presence]'); \
         return (p && p.textContent === 'online') || null",
        json!([node.device_id]),
        &[],
    )
    .await;
    anchor
}

async fn narrow_screen(wd: &Page) {
    wd.click("[data-nav=inventory]").await;
    wd.set_window(390, 844).await;
    let widths = wd
        .wait_js(
            "the inventory on a narrow screen",
            "const t = document.getElementById('inventory'); \
             return (t && !document.getElementById('view-inventory').hidden) \
               ? [document.documentElement.scrollWidth, window.innerWidth] : null",
        )
        .await;
    assert!(
        widths[0].as_f64().unwrap() <= widths[1].as_f64().unwrap(),
        "no horizontal scrolling on a narrow screen: {widths}"
    );
    wd.js(
        "document.getElementById('inventory').scrollIntoView()",
        json!([]),
    )
    .await;
    wd.shot("inventory-narrow").await;
    wd.set_window(1280, 900).await;
}

async fn page_hygiene(wd: &Page, console: &str) {
    let violations = wd.js("return window.__csp", json!([])).await;
    assert_eq!(violations, json!([]), "CSP violations");
    let foreign = wd
        .js(
            "return performance.getEntriesByType('resource').map(e => e.name) \
               .filter(n => !n.startsWith(arguments[0]) && !n.startsWith('blob:') && !n.startsWith('data:'))",
            json!([console]),
        )
        .await;
    assert_eq!(foreign, json!([]), "requests to another origin");
}

async fn screenshot_inventory(wd: &Page, node1: &NodeInfo, node2: &NodeInfo) {
    wd.click("[data-nav=inventory]").await;
    wd.wait_js_args(
        "the inventory with both nodes",
        "const t = (id, k) => { const r = document.querySelector(`#inventory tr[data-device-id=\"${id}\"]`); \
                                const b = r && r.querySelector(`[data-kind=${k}]`); return b && b.textContent; }; \
         return (t(arguments[0], 'presence') === 'online' && t(arguments[1], 'trust') === 'revoked') || null",
        json!([node1.device_id, node2.device_id]),
        &[],
    )
    .await;
    // Let relative times settle and banners fade from view.
    wd.js(
        "for (const b of document.querySelectorAll('#banners .banner')) b.remove(); \
         document.activeElement && document.activeElement.blur()",
        json!([]),
    )
    .await;
    let png = wd.screenshot().await;
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    // The committed screenshot in docs/ is refreshed on request, so a test run leaves the
    // checkout clean; otherwise it lands in the target directory.
    let path = if std::env::var_os("ANCHORAGE_UPDATE_SCREENSHOT").is_some() {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/console-inventory.png")
    } else {
        std::env::temp_dir().join("anchorage-console-inventory.png")
    };
    std::fs::write(&path, &png).unwrap();
    println!("screenshot: {} ({} bytes)", path.display(), png.len());
}

// ---------------------------------------------------------------------------------------------
// Nodes

struct NodeInfo {
    device_id: String,
    name: String,
}

/// Pairs a node with a PIN minted and approved through the API (not the page).
async fn pair_with_client(
    client: &ControlPlaneClient,
    quic: &str,
    state_dir: &Path,
    name: &str,
    cwd: &Path,
) -> NodeInfo {
    let code = client
        .mint_code(MintCodeRequest {
            method: PairMethod::Pin,
            ttl_secs: None,
            labels: Default::default(),
        })
        .await
        .unwrap();
    let mut pairing = Proc::spawn(
        "anchor-node pair (one)",
        command(&bins().anchor_node, cwd).args([
            "pair",
            "--anchor",
            quic,
            "--code",
            &code.code,
            "--state-dir",
            path_str(state_dir),
            "--name",
            name,
            "--json",
        ]),
    );
    let deadline = Instant::now() + STEP;
    let request = loop {
        let pending = client
            .list_requests(Some(RequestState::PendingApproval))
            .await
            .unwrap();
        if let Some(r) = pending.into_iter().find(|r| r.device_name == name) {
            break r;
        }
        if Instant::now() > deadline {
            panic!("no pairing request from {name}\n{}", pairing.log_tail());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    client.approve(&request.request_id).await.unwrap();
    let status = pairing.wait_exit_async(STEP).await;
    assert!(status.success(), "{status}\n{}", pairing.log_tail());
    let out: Value = serde_json::from_str(pairing.stdout().trim()).unwrap();
    assert_eq!(out["device_id"], request.device_id.to_string());
    NodeInfo {
        device_id: request.device_id.to_string(),
        name: name.to_string(),
    }
}

// ---------------------------------------------------------------------------------------------
// Environment: browser, binaries, ports

/// The WebDriver server's path, or `None` (and a line saying why) when the test is skipped.
fn browser_available(browser: Browser) -> Option<PathBuf> {
    let required = std::env::var("ANCHORAGE_BROWSER_TEST").is_ok_and(|v| !v.is_empty() && v != "0");
    let binary = Path::new(browser.binary()).is_file();
    let driver = find_in_path(browser.driver());
    match (binary, driver) {
        (true, Some(driver)) => Some(driver),
        (binary, driver) => {
            let missing = [
                (!binary).then_some(browser.binary()),
                driver.is_none().then_some(browser.driver()),
            ]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
            .join(" and ");
            if required {
                panic!(
                    "ANCHORAGE_BROWSER_TEST is set but {missing} is missing ({})",
                    browser.install_hint()
                );
            }
            println!(
                "SKIPPED web_console_in_a_headless_browser: {missing} not found \
                 ({}, or set ANCHORAGE_BROWSER_TEST=1 to make this a failure)",
                browser.install_hint()
            );
            None
        }
    }
}

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

// ---------------------------------------------------------------------------------------------
// The page, through a WebDriver session

/// A WebDriver session on the console page, with the waits and retries the steps need. A
/// session not quit (a step panicked) is closed by the client when dropped.
struct Page {
    driver: Option<WebDriver>,
}

impl Page {
    /// Waits for the WebDriver server on `port`, then opens a session of `browser`.
    async fn start(browser: Browser, port: u16, profile: &Path) -> Page {
        let url = format!("http://127.0.0.1:{port}");
        let config = WebDriverConfig::builder()
            .reqwest_timeout(Duration::from_secs(60))
            .build()
            .unwrap();
        let deadline = Instant::now() + STEP;
        let driver = loop {
            match WebDriver::new_with_config(&url, browser.capabilities(profile), config.clone())
                .await
            {
                Ok(d) => break d,
                Err(e) => {
                    assert!(
                        Instant::now() < deadline,
                        "{} did not start a session: {e}",
                        browser.driver()
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        println!(
            "{} via {} on port {port}, session {}",
            browser.name(),
            browser.driver(),
            driver.session_id()
        );
        let page = Page {
            driver: Some(driver),
        };
        // The same window everywhere, for a stable screenshot (Chromium also starts at it).
        page.set_window(1280, 900).await;
        page
    }

    fn driver(&self) -> &WebDriver {
        self.driver
            .as_ref()
            .expect("the session is open until quit")
    }

    async fn goto(&self, url: &str) {
        self.driver()
            .goto(url)
            .await
            .unwrap_or_else(|e| panic!("WebDriver goto {url}: {e}"));
    }

    /// Finds the element at `css` and runs `action` on it. The page re-renders on live
    /// events; an element replaced between the two calls is looked up again.
    async fn on_element<F, Fut>(&self, css: &str, what: &str, action: F)
    where
        F: Fn(thirtyfour::WebElement) -> Fut,
        Fut: std::future::Future<Output = thirtyfour::error::WebDriverResult<()>>,
    {
        let mut attempts = 0;
        loop {
            let element = self
                .driver()
                .find(By::Css(css))
                .await
                .unwrap_or_else(|e| panic!("no element {css}: {e}"));
            match action(element).await {
                Ok(()) => return,
                Err(e)
                    if matches!(e.as_inner(), WebDriverErrorInner::StaleElementReference(_))
                        && attempts < 10 =>
                {
                    attempts += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("WebDriver {what} on {css}: {e}"),
            }
        }
    }

    async fn click(&self, css: &str) {
        self.on_element(css, "click", |e| async move { e.click().await })
            .await;
    }

    async fn clear(&self, css: &str) {
        self.on_element(css, "clear", |e| async move { e.clear().await })
            .await;
    }

    async fn type_into(&self, css: &str, text: &str) {
        self.on_element(css, "send keys", |e| async move { e.send_keys(text).await })
            .await;
    }

    async fn js(&self, script: &str, args: Value) -> Value {
        let args = match args {
            Value::Array(a) => a,
            other => vec![other],
        };
        self.driver()
            .execute(script, args)
            .await
            .unwrap_or_else(|e| panic!("WebDriver execute {script:?}: {e}"))
            .json()
            .clone()
    }

    async fn wait_js(&self, what: &str, script: &str) -> Value {
        self.wait_js_args(what, script, json!([]), &[]).await
    }

    /// Polls `script` until it returns something other than `null`; on timeout fails with
    /// `what`, the `context` scripts' answers and the page's banners.
    async fn wait_js_args(
        &self,
        what: &str,
        script: &str,
        args: Value,
        context: &[(&str, &str)],
    ) -> Value {
        let deadline = Instant::now() + STEP;
        loop {
            let v = self.js(script, args.clone()).await;
            if !v.is_null() {
                return v;
            }
            if Instant::now() > deadline {
                let mut why = format!("timed out waiting for {what}");
                for (name, s) in context {
                    let v = self.js(s, args.clone()).await;
                    why.push_str(&format!("\n  {name}: {v}"));
                }
                let banners = self
                    .js(
                        "return document.getElementById('banners').innerText + ' | ' + \
                         document.getElementById('stream-status').textContent + ' | ' + location.hash",
                        json!([]),
                    )
                    .await;
                why.push_str(&format!("\n  page: {banners}"));
                panic!("{why}");
            }
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
    }

    async fn set_window(&self, width: u32, height: u32) {
        self.driver()
            .set_window_rect(0, 0, width, height)
            .await
            .unwrap_or_else(|e| panic!("WebDriver set window {width}x{height}: {e}"));
    }

    async fn screenshot(&self) -> Vec<u8> {
        self.driver()
            .screenshot_as_png()
            .await
            .unwrap_or_else(|e| panic!("WebDriver screenshot: {e}"))
    }

    /// With `ANCHORAGE_BROWSER_SHOTS=<dir>`, saves a screenshot of the page as `<dir>/<name>.png`
    /// (to look at the pages while changing them).
    async fn shot(&self, name: &str) {
        let Some(dir) = std::env::var_os("ANCHORAGE_BROWSER_SHOTS") else {
            return;
        };
        let path = Path::new(&dir).join(format!("{name}.png"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(&path, self.screenshot().await).unwrap();
        println!("screenshot: {}", path.display());
    }

    /// Ends the session: the browser closes.
    async fn quit(&mut self) {
        if let Some(driver) = self.driver.take() {
            driver.quit().await.unwrap();
        }
    }
}
