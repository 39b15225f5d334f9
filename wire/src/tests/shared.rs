//! The types every crate shares: [`DeviceId`]'s text form, and the exact JSON and postcard of
//! ids and state enums (the console's API and the anchor's store depend on both).

use proptest::prelude::*;

use super::{config, hex};
use crate::device::{DEVICE_ID_LEN, DeviceId};
use crate::invoke::InvocationId;
use crate::state::{InvocationState, Presence, TrustState};

/// A fixed id: bytes 0, 1, ..., 19.
fn sample() -> DeviceId {
    let mut bytes = [0u8; DEVICE_ID_LEN];
    for (i, b) in bytes.iter_mut().enumerate() {
        *b = i as u8;
    }
    DeviceId::from_bytes(bytes)
}

/// [`sample`] as people see it (RFC 4648 base32 of the bytes, worked out independently).
const SAMPLE_TEXT: &str = "aaaq-eaye-auda-ocaj-bifq-ydio-b4ib-ceqt";

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn device_id_display_parse_round_trip(id in any::<DeviceId>()) {
        let shown = id.to_string();
        prop_assert_eq!(shown.len(), 32 + 7, "eight groups of four: {}", shown);
        prop_assert_eq!(shown.matches('-').count(), 7);
        prop_assert_eq!(shown.parse::<DeviceId>(), Ok(id));
        prop_assert_eq!(id.compact().parse::<DeviceId>(), Ok(id));
        prop_assert_eq!(shown.to_uppercase().parse::<DeviceId>(), Ok(id));
        prop_assert_eq!(DeviceId::from_uri(&id.uri()), Some(id));
        prop_assert_eq!(serde_json::to_string(&id).unwrap(), format!("\"{shown}\""));
        prop_assert_eq!(serde_json::from_str::<DeviceId>(&format!("\"{shown}\"")).unwrap(), id);
        prop_assert_eq!(postcard::to_stdvec(&id).unwrap(), id.as_bytes().to_vec());
    }

    #[test]
    fn device_id_parse_never_panics(s in "\\PC{0,48}") {
        let _ = s.parse::<DeviceId>();
    }

    #[test]
    fn invocation_id_is_hex_in_json_and_bare_in_postcard(id in any::<InvocationId>()) {
        prop_assert_eq!(serde_json::to_string(&id).unwrap(), format!("\"{id}\""));
        prop_assert_eq!(serde_json::from_str::<InvocationId>(&format!("\"{id}\"")).unwrap(), id);
        prop_assert_eq!(postcard::to_stdvec(&id).unwrap(), id.0.to_vec());
        prop_assert_eq!(postcard::from_bytes::<InvocationId>(&id.0).unwrap(), id);
    }
}

#[test]
fn device_id_text_and_bytes_are_pinned() {
    let id = sample();
    assert_eq!(id.to_string(), SAMPLE_TEXT);
    assert_eq!(id.compact(), SAMPLE_TEXT.replace('-', ""));
    assert_eq!(id.short(), "aaaqeaye");
    assert_eq!(id.uri(), format!("urn:anchorage:device:{}", id.compact()));
    assert_eq!(
        hex(&postcard::to_stdvec(&id).unwrap()),
        "000102030405060708090a0b0c0d0e0f10111213",
        "20 bare bytes, no length"
    );
    assert_eq!(
        postcard::from_bytes::<DeviceId>(&postcard::to_stdvec(&id).unwrap()).unwrap(),
        id
    );
    assert_eq!(format!("{id:?}"), format!("DeviceId({SAMPLE_TEXT})"));
}

#[test]
fn device_id_rejects_garbage() {
    for bad in [
        "",
        "abc",
        "0000-0000-0000-0000-0000-0000-0000-0000",
        &"a".repeat(33),
        &"a".repeat(31),
        "DEV-1",
    ] {
        let err = bad.parse::<DeviceId>().unwrap_err();
        assert!(
            err.to_string().contains("invalid device id"),
            "{bad:?}: {err}"
        );
    }
    assert_eq!(DeviceId::from_uri("https://example.com/"), None);
    assert!(serde_json::from_str::<DeviceId>("\"nope\"").is_err());
}

/// JSON names (the console's contract) and postcard indices (the anchor's store) of every state.
/// The `match`es have no wildcard, so a new variant does not compile until it is pinned here.
#[test]
fn state_names_and_indices_are_pinned() {
    fn check<T>(all: &[T], pinned: impl Fn(T) -> (&'static str, u8))
    where
        T: Copy + std::fmt::Debug + PartialEq + std::fmt::Display + std::str::FromStr,
        T: serde::Serialize + serde::de::DeserializeOwned,
        <T as std::str::FromStr>::Err: std::fmt::Debug,
    {
        for (i, &state) in all.iter().enumerate() {
            let (name, index) = pinned(state);
            assert_eq!(usize::from(index), i, "{state:?} is listed out of order");
            assert_eq!(
                serde_json::to_string(&state).unwrap(),
                format!("\"{name}\"")
            );
            assert_eq!(
                serde_json::from_str::<T>(&format!("\"{name}\"")).unwrap(),
                state
            );
            assert_eq!(state.to_string(), name);
            assert_eq!(name.parse::<T>().unwrap(), state);
            assert_eq!(postcard::to_stdvec(&state).unwrap(), [index], "{state:?}");
        }
    }
    check(Presence::ALL, |p| match p {
        Presence::Online => ("online", 0),
        Presence::Degraded => ("degraded", 1),
        Presence::Stale => ("stale", 2),
        Presence::Offline => ("offline", 3),
        Presence::Unknown => ("unknown", 4),
    });
    check(TrustState::ALL, |t| match t {
        TrustState::Trusted => ("trusted", 0),
        TrustState::Pending => ("pending", 1),
        TrustState::Revoked => ("revoked", 2),
        TrustState::Removed => ("removed", 3),
        TrustState::Unknown => ("unknown", 4),
    });
    check(InvocationState::ALL, |s| match s {
        InvocationState::Queued => ("queued", 0),
        InvocationState::Dispatched => ("dispatched", 1),
        InvocationState::Succeeded => ("succeeded", 2),
        InvocationState::Failed => ("failed", 3),
        InvocationState::TimedOut => ("timed_out", 4),
        InvocationState::Rejected => ("rejected", 5),
    });
    assert_eq!(Presence::ALL.len(), 5);
    assert_eq!(TrustState::ALL.len(), 5);
    assert_eq!(InvocationState::ALL.len(), 6);
}

#[test]
fn unknown_state_names_are_refused_with_the_choices() {
    let err = "sleeping".parse::<Presence>().unwrap_err().to_string();
    assert_eq!(
        err,
        "unknown presence \"sleeping\"; expected one of: online, degraded, stale, offline, unknown"
    );
    assert!("Trusted".parse::<TrustState>().is_err(), "names are exact");
    assert!("timed-out".parse::<InvocationState>().is_err());
}

#[test]
fn only_queued_and_dispatched_invocations_are_unfinished() {
    for &s in InvocationState::ALL {
        let running = matches!(s, InvocationState::Queued | InvocationState::Dispatched);
        assert_eq!(s.is_final(), !running, "{s:?}");
    }
}
