//! Every top-level message survives framing, chunked delivery and (datagrams) datagram encoding.

use proptest::collection::vec;
use proptest::prelude::*;

use super::{Message, config, feed_in_chunks};
use crate::{
    Decoded,
    datagram::Datagram,
    decode_frame, encode_frame,
    frame::{HEADER_LEN, decode_body},
};

/// `encode_frame` then `decode_frame` gives the message back, using the whole frame, and the
/// length prefix is the body length.
fn check_frame<T: Message>(msg: &T) -> Result<(), TestCaseError> {
    let frame = encode_frame(msg)?;
    prop_assert!(
        frame.len() > HEADER_LEN,
        "every message has a non-empty body"
    );
    let announced = u32::from_be_bytes([frame[0], frame[1], frame[2], frame[3]]) as usize;
    prop_assert_eq!(announced, frame.len() - HEADER_LEN);
    prop_assert_eq!(decode_body::<T>(&frame[HEADER_LEN..])?, msg.clone());
    match decode_frame::<T>(&frame)? {
        Decoded::Frame {
            msg: back,
            consumed,
        } => {
            prop_assert_eq!(&back, msg);
            prop_assert_eq!(consumed, frame.len());
        }
        Decoded::NeedMore { at_least } => {
            return Err(TestCaseError::fail(format!(
                "a whole frame asked for {at_least} bytes"
            )));
        }
    }
    Ok(())
}

/// Several frames back to back, delivered in chunks of the given sizes, decode to the same
/// messages in the same order; between pushes the decoder holds only a strict prefix of the next
/// frame (it never sits on a whole undecoded frame, and never loses a boundary).
fn check_chunked<T: Message>(msgs: &[T], chunks: &[usize]) -> Result<(), TestCaseError> {
    let mut stream = Vec::new();
    let mut ends = Vec::new();
    for m in msgs {
        stream.extend(encode_frame(m)?);
        ends.push(stream.len());
    }
    let fed = feed_in_chunks::<T>(&stream, chunks);
    prop_assert!(fed.error.is_none(), "valid frames failed: {:?}", fed.error);
    prop_assert_eq!(&fed.msgs, &msgs.to_vec());
    for &(pushed, buffered, taken) in &fed.steps {
        let start = if taken == 0 { 0 } else { ends[taken - 1] };
        prop_assert_eq!(
            pushed - buffered,
            start,
            "decoded bytes must end on a frame boundary"
        );
        if let Some(&end) = ends.get(taken) {
            prop_assert!(pushed < end, "a whole frame was left in the decoder");
        } else {
            prop_assert_eq!(buffered, 0);
        }
    }
    Ok(())
}

/// One test module per top-level message type.
macro_rules! roundtrip_suite {
    ($($name:ident: $ty:ty),* $(,)?) => {$(
        mod $name {
            use super::*;

            proptest! {
                #![proptest_config(config(256))]

                #[test]
                fn frame(msg in any::<$ty>()) {
                    check_frame(&msg)?;
                }

                #[test]
                fn chunked(
                    msgs in vec(any::<$ty>(), 1..5),
                    chunks in vec(1usize..48, 1..6),
                ) {
                    check_chunked(&msgs, &chunks)?;
                }
            }

            /// Byte-at-a-time delivery is the worst case for the decoder's bookkeeping.
            #[test]
            fn one_byte_at_a_time() {
                let mut runner = proptest::test_runner::TestRunner::new(config(8));
                runner
                    .run(&vec(any::<$ty>(), 1..4), |msgs| check_chunked(&msgs, &[1]))
                    .unwrap();
            }
        }
    )*};
}

roundtrip_suite! {
    bootstrap_request: crate::bootstrap::BootstrapRequest,
    bootstrap_response: crate::bootstrap::BootstrapResponse,
    control_up: crate::control::ControlUp,
    control_down: crate::control::ControlDown,
    invoke_request: crate::invoke::InvokeRequest,
    invoke_reply: crate::invoke::InvokeReply,
    datagram: crate::datagram::Datagram,
    relay: crate::peer::Relay,
    peer_open: crate::peer::PeerOpen,
    tunnel_reply: crate::peer::TunnelReply,
}

proptest! {
    #![proptest_config(config(256))]

    /// A probe is the magic then a strict postcard body, and always small. (An IPv6
    /// address's scope id and flow label do not travel: compare the bytes.)
    #[test]
    fn probe_payload(probe in any::<crate::peer::Probe>()) {
        let bytes = probe.encode();
        prop_assert!(bytes.len() <= crate::peer::MAX_PROBE_LEN);
        let back = crate::peer::Probe::decode(&bytes);
        prop_assert!(back.is_some());
        prop_assert_eq!(back.map(|p| p.encode()), Some(bytes));
    }

    /// Bytes that are not a probe never decode as one, and never panic.
    #[test]
    fn probe_garbage(bytes in vec(any::<u8>(), 0..200)) {
        if let Some(p) = crate::peer::Probe::decode(&bytes) {
            prop_assert_eq!(p.encode(), bytes);
        }
    }
}

proptest! {
    #![proptest_config(config(256))]

    /// A datagram payload is the bare postcard body: no length prefix, size-checked, strict.
    #[test]
    fn datagram_payload(dg in any::<Datagram>()) {
        let bytes = match dg.encode() {
            // An invocation copy is only sent when it fits; the encoder refuses the rest.
            Err(crate::FrameError::TooLarge { .. })
                if matches!(dg, Datagram::InvokeCopy(_) | Datagram::ResultCopy(_)) =>
            {
                return Ok(());
            }
            other => other?,
        };
        prop_assert!(bytes.len() <= crate::limits::MAX_DATAGRAM_LEN);
        prop_assert_eq!(Datagram::decode(&bytes)?, dg.clone());
        // The same body as a frame's, without the prefix.
        prop_assert_eq!(&encode_frame(&dg)?[HEADER_LEN..], &bytes[..]);
    }
}
