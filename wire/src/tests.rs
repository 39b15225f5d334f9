//! Tests of the wire format.
//!
//! - [`roundtrip`]: every top-level message survives `encode_frame` → `decode_frame`, the
//!   incremental [`FrameDecoder`] fed in arbitrary chunks, and (datagrams) `Datagram::encode`.
//! - [`golden`]: exact bytes of hand-built messages of every stream, and the index of every
//!   variant of every wire enum, so the format cannot drift.
//! - [`robustness`]: arbitrary and mutated bytes never panic any decoder, and every way a frame
//!   can be wrong gives the documented error and close code.
//! - [`limits`]: `validate` refuses every over-long field by name, and the largest valid
//!   message of each kind still fits in a frame.
//! - [`codes`]: the stable numbers and names of error codes and pairing failures, the
//!   `FrameError` → close code mapping, and the protocol constants.
//! - [`ids`]: `InvocationId` text form.
//! - [`shared`]: `DeviceId`, and the JSON and postcard forms of ids and state enums.

mod codes;
mod golden;
mod ids;
mod limits;
mod robustness;
mod roundtrip;
mod shared;

use std::fmt::Debug;

use proptest::prelude::*;
use serde::{Serialize, de::DeserializeOwned};

use crate::FrameDecoder;

/// Bounds every message type under test satisfies.
trait Message: Serialize + DeserializeOwned + PartialEq + Debug + Clone {}
impl<T: Serialize + DeserializeOwned + PartialEq + Debug + Clone> Message for T {}

/// Proptest settings: enough cases to find encoding bugs, few enough for a quick `cargo test`.
fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        // Shrinking a structured message is slow and rarely needed to read the failure.
        max_shrink_iters: 256,
        // Failures print the minimal input; no regression files are written into the crate.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Parses hex for golden fixtures: whitespace is ignored and `#` starts a comment to the end of
/// the line, so each field can be annotated.
fn unhex(s: &str) -> Vec<u8> {
    let digits: Vec<u8> = s
        .lines()
        .flat_map(|line| line.split('#').next().unwrap_or("").bytes())
        .filter(|b| !b.is_ascii_whitespace())
        .collect();
    assert!(
        digits.len().is_multiple_of(2),
        "odd number of hex digits in fixture"
    );
    digits
        .chunks_exact(2)
        .map(|pair| {
            let text = std::str::from_utf8(pair).expect("ascii");
            u8::from_str_radix(text, 16).expect("hex digit in fixture")
        })
        .collect()
}

/// Lowercase hex with no separators, for failure messages.
fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A frame with a correct length prefix around an arbitrary body.
fn frame_of(body: &[u8]) -> Vec<u8> {
    let len = u32::try_from(body.len()).expect("test bodies are small");
    let mut out = len.to_be_bytes().to_vec();
    out.extend_from_slice(body);
    out
}

/// What a decoder did with a byte stream fed in chunks.
struct Fed<T> {
    /// Messages taken, in order.
    msgs: Vec<T>,
    /// The error that stopped it, if any.
    error: Option<crate::FrameError>,
    /// After each push and drain: (bytes pushed so far, bytes buffered, messages so far).
    steps: Vec<(usize, usize, usize)>,
}

/// Feeds `bytes` to a fresh decoder in chunks whose sizes cycle through `chunks` (each >= 1),
/// draining it after every push, as a stream reader would.
fn feed_in_chunks<T: Message>(bytes: &[u8], chunks: &[usize]) -> Fed<T> {
    let mut dec = FrameDecoder::default();
    let mut fed = Fed {
        msgs: Vec::new(),
        error: None,
        steps: Vec::new(),
    };
    let mut pushed = 0;
    let mut sizes = chunks.iter().copied().cycle();
    while pushed < bytes.len() {
        let n = sizes.next().unwrap_or(1).clamp(1, bytes.len() - pushed);
        let chunk = &bytes[pushed..pushed + n];
        pushed += n;
        if let Err(e) = dec.push(chunk) {
            fed.error = Some(e);
            break;
        }
        loop {
            match dec.next::<T>() {
                Ok(Some(msg)) => fed.msgs.push(msg),
                Ok(None) => break,
                Err(e) => {
                    fed.error = Some(e);
                    break;
                }
            }
        }
        if fed.error.is_some() {
            break;
        }
        fed.steps.push((pushed, dec.buffered(), fed.msgs.len()));
    }
    if fed.error.is_some() {
        assert_eq!(dec.buffered(), 0, "a failed decoder must drop its buffer");
        assert!(dec.push(b"x").is_err(), "a failed decoder must stay failed");
        assert!(
            dec.next::<T>().is_err(),
            "a failed decoder must stay failed"
        );
    }
    fed
}
