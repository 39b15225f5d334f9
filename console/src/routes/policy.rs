//! `/console/v1/policy`: the mesh policy, as operators set, see, test and look back on it.
//!
//! - `GET /policy` (`observability.read`): the policy in force with its parsed rules.
//! - `PUT /policy` (`trust.operate`, a token not limited to a selector): the TOML file as
//!   the body, at most [`MAX_POLICY_BYTES`]; 400 `invalid_policy` with every error and its
//!   line, and nothing changed, when the file is wrong.
//! - `GET /policy/history?limit=N` (`observability.read`): versions, newest first.
//! - `GET /policy/test?from=DEV&to=DEV&capability=C` (or `&service=S`)
//!   (`observability.read`, both devices in the token's scope): whether the policy lets
//!   `from` do it on `to`, and which rule says so. `DEV` is a device id, a unique prefix of
//!   one (at least [`MIN_ID_PREFIX`] characters), or a device name.

use super::*;

/// Shortest device id prefix `policy/test` resolves (shorter would match half the fleet).
pub const MIN_ID_PREFIX: usize = 4;
/// Most versions one `GET /policy/history` returns.
pub const MAX_HISTORY: usize = 100;

pub(super) fn routes<B: Backend>() -> Router<AppState<B>> {
    Router::new()
        .route(
            "/policy",
            get(show::<B>)
                .put(set::<B>)
                .layer(DefaultBodyLimit::max(MAX_POLICY_BYTES)),
        )
        .route("/policy/history", get(history::<B>))
        .route("/policy/test", get(test::<B>))
}

async fn show<B: Backend>(
    State(st): State<AppState<B>>,
    auth: Auth,
) -> Result<Json<PolicyInfo>, ApiError> {
    require(&auth, Permission::ObservabilityRead)?;
    Ok(Json(st.backend.policy().await?))
}

async fn set<B: Backend>(
    State(st): State<AppState<B>>,
    auth: Auth,
    body: RawBody,
) -> Result<Json<PolicyInfo>, SetPolicyError> {
    let who = require(&auth, Permission::TrustOperate)?;
    refuse_scoped(who, "the mesh policy")?;
    check_text_body(&body)?;
    let text = String::from_utf8(body.bytes.to_vec())
        .map_err(|_| ApiError::bad_request("the policy must be UTF-8 text"))?;
    Ok(Json(st.backend.set_policy(who, text).await?))
}

/// The policy is sent as the file itself: no content type, `text/*` or `application/toml`.
fn check_text_body(body: &RawBody) -> Result<(), ApiError> {
    let Some(value) = &body.content_type else {
        return Ok(());
    };
    let essence = value
        .to_str()
        .unwrap_or_default()
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    if essence.starts_with("text/")
        || essence == "application/toml"
        || essence == "application/octet-stream"
    {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "the body is the policy file itself (Content-Type: text/plain or application/toml)",
        ))
    }
}

#[derive(Deserialize)]
struct HistoryQuery {
    limit: Option<usize>,
}

async fn history<B: Backend>(
    State(st): State<AppState<B>>,
    auth: Auth,
    uri: Uri,
) -> Result<Json<Vec<PolicyVersionInfo>>, ApiError> {
    require(&auth, Permission::ObservabilityRead)?;
    let q: HistoryQuery = query(&uri)?;
    let limit = q
        .limit
        .unwrap_or(DEFAULT_POLICY_HISTORY)
        .clamp(1, MAX_HISTORY);
    Ok(Json(st.backend.policy_history(limit).await?))
}

#[derive(Deserialize)]
struct TestQuery {
    from: Option<String>,
    to: Option<String>,
    capability: Option<String>,
    service: Option<String>,
}

async fn test<B: Backend>(
    State(st): State<AppState<B>>,
    auth: Auth,
    uri: Uri,
) -> Result<Json<PolicyTestResult>, ApiError> {
    let who = require(&auth, Permission::ObservabilityRead)?;
    let q: TestQuery = query(&uri)?;
    let given = |v: Option<String>| v.filter(|s| !s.trim().is_empty());
    let (Some(from), Some(to)) = (given(q.from), given(q.to)) else {
        return Err(ApiError::bad_request(
            "`from` and `to` are required: a device id, a unique id prefix, or a device name",
        ));
    };
    let action = match (given(q.capability), given(q.service)) {
        (Some(c), None) => {
            check_text("capability", &c)?;
            PolicyAction::Capability(c)
        }
        (None, Some(s)) => {
            check_text("service", &s)?;
            PolicyAction::Service(s)
        }
        _ => {
            return Err(ApiError::bad_request(
                "give exactly one of `capability` and `service`",
            ));
        }
    };
    check_text("from", &from)?;
    check_text("to", &to)?;
    let mut devices = st.backend.list_devices().await?;
    // A token limited to a selector neither tests nor learns of devices outside it.
    devices.retain(|d| who.scope.covers(&d.labels));
    let from = resolve(&devices, &from)?.device_id;
    let to = resolve(&devices, &to)?.device_id;
    Ok(Json(st.backend.policy_test(from, to, action).await?))
}

/// The device `text` names: its id, else a device of that name, else the one device whose id
/// starts with it. None is a 404, several a 400 `ambiguous_device` naming them.
pub fn resolve<'a>(devices: &'a [Device], text: &str) -> Result<&'a Device, ApiError> {
    let text = text.trim();
    let not_found =
        || ApiError::not_found(format!("no device has the id, name or id prefix {text:?}"));
    if let Ok(id) = text.parse::<DeviceId>() {
        return devices
            .iter()
            .find(|d| d.device_id == id)
            .ok_or_else(not_found);
    }
    let named: Vec<&Device> = devices.iter().filter(|d| d.name == text).collect();
    match named.as_slice() {
        [one] => return Ok(one),
        [] => {}
        several => return Err(ambiguous(text, "devices are named", several)),
    }
    let prefix: String = text
        .chars()
        .filter(|c| *c != '-')
        .map(|c| c.to_ascii_uppercase())
        .collect();
    if prefix.len() < MIN_ID_PREFIX {
        return Err(not_found());
    }
    let hits: Vec<&Device> = devices
        .iter()
        .filter(|d| {
            d.device_id
                .compact()
                .to_ascii_uppercase()
                .starts_with(&prefix)
        })
        .collect();
    match hits.as_slice() {
        [one] => Ok(one),
        [] => Err(not_found()),
        several => Err(ambiguous(text, "device ids start with", several)),
    }
}

fn ambiguous(text: &str, how: &str, devices: &[&Device]) -> ApiError {
    const SHOWN: usize = 5;
    let mut names: Vec<String> = devices
        .iter()
        .take(SHOWN)
        .map(|d| format!("{} ({})", d.name, d.device_id))
        .collect();
    if devices.len() > SHOWN {
        names.push(format!("and {} more", devices.len() - SHOWN));
    }
    ApiError::new(
        StatusCode::BAD_REQUEST,
        "ambiguous_device",
        format!(
            "{} {how} {text:?}: {}; give the device id",
            devices.len(),
            names.join(", ")
        ),
    )
}
