//! Nothing that arrives from the network may panic, and every way a frame can be wrong gives the
//! documented error (and so the documented close code).

use proptest::collection::vec;
use proptest::prelude::*;

use super::{Message, config, feed_in_chunks, frame_of};
use crate::{
    Decoded, ErrorCode, FrameDecoder, FrameError,
    bootstrap::{BootstrapRequest, BootstrapResponse},
    control::{ControlDown, ControlUp},
    datagram::Datagram,
    decode_frame, encode_frame,
    frame::{HEADER_LEN, decode_frame_with_limit, encode_frame_with_limit},
    invoke::{InvokeReply, InvokeRequest},
    limits::{MAX_DATAGRAM_LEN, MAX_FRAME_LEN},
};

/// Decodes `buf` as one frame of `T` and checks the answer is coherent, whatever the bytes:
/// a message uses exactly the announced frame and re-encodes to an equal message; "need more"
/// asks for more than there is; an error is a peer fault with a frame close code.
fn check_decode<T: Message>(buf: &[u8]) -> Result<(), TestCaseError> {
    match decode_frame::<T>(buf) {
        Ok(Decoded::Frame { msg, consumed }) => {
            let announced = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
            prop_assert_eq!(consumed, HEADER_LEN + announced);
            prop_assert!(consumed <= buf.len());
            // Decoders accept over-long varints, so the bytes may differ; the message may not.
            let again = encode_frame(&msg)?;
            prop_assert!(
                again.len() <= consumed,
                "canonical encoding is never longer"
            );
            prop_assert_eq!(
                decode_frame::<T>(&again)?,
                Decoded::Frame {
                    msg,
                    consumed: again.len()
                }
            );
        }
        Ok(Decoded::NeedMore { at_least }) => {
            prop_assert!(at_least > buf.len());
            prop_assert!(at_least <= HEADER_LEN + MAX_FRAME_LEN);
        }
        Err(e) => {
            prop_assert!(
                matches!(e.code(), ErrorCode::BadFrame | ErrorCode::FrameTooLarge),
                "{e:?} is not a peer fault"
            );
        }
    }
    Ok(())
}

/// Runs [`check_decode`] for every frame-carried message type.
fn check_decode_all(buf: &[u8]) -> Result<(), TestCaseError> {
    check_decode::<BootstrapRequest>(buf)?;
    check_decode::<BootstrapResponse>(buf)?;
    check_decode::<ControlUp>(buf)?;
    check_decode::<ControlDown>(buf)?;
    check_decode::<InvokeRequest>(buf)?;
    check_decode::<InvokeReply>(buf)?;
    check_decode::<Datagram>(buf)?;
    Ok(())
}

/// Decoding the whole stream with [`decode_frame`] frame after frame, and feeding it to a
/// [`FrameDecoder`] in chunks, agree: the same messages when the stream is valid (however it is
/// split), and an error from both when it is not. The decoder may fail earlier than the slice
/// walk, because `push` refuses an oversize header as soon as it arrives, even behind frames
/// not yet taken; it then delivers only a prefix of the messages.
fn check_decoder_agrees<T: Message>(stream: &[u8], chunks: &[usize]) -> Result<(), TestCaseError> {
    let mut expected = Vec::new();
    let mut expected_error = None;
    let mut rest = stream;
    loop {
        match decode_frame::<T>(rest) {
            Ok(Decoded::Frame { msg, consumed }) => {
                expected.push(msg);
                rest = &rest[consumed..];
            }
            Ok(Decoded::NeedMore { .. }) => break,
            Err(e) => {
                expected_error = Some(e);
                break;
            }
        }
    }
    let fed = feed_in_chunks::<T>(stream, chunks);
    match (&expected_error, &fed.error) {
        (None, _) => {
            prop_assert_eq!(&fed.error, &None);
            prop_assert_eq!(&fed.msgs, &expected);
        }
        (Some(walk), Some(dec)) => {
            prop_assert!(
                dec == walk || matches!(dec, FrameError::TooLarge { .. }),
                "decoder failed with {dec:?}, the slice walk with {walk:?}"
            );
            prop_assert!(expected.starts_with(&fed.msgs));
        }
        (Some(walk), None) => {
            return Err(TestCaseError::fail(format!(
                "decoder accepted what failed with {walk:?}"
            )));
        }
    }
    Ok(())
}

fn check_decoder_agrees_all(stream: &[u8], chunks: &[usize]) -> Result<(), TestCaseError> {
    check_decoder_agrees::<BootstrapRequest>(stream, chunks)?;
    check_decoder_agrees::<BootstrapResponse>(stream, chunks)?;
    check_decoder_agrees::<ControlUp>(stream, chunks)?;
    check_decoder_agrees::<ControlDown>(stream, chunks)?;
    check_decoder_agrees::<InvokeRequest>(stream, chunks)?;
    check_decoder_agrees::<InvokeReply>(stream, chunks)?;
    check_decoder_agrees::<Datagram>(stream, chunks)?;
    Ok(())
}

/// Arbitrary bodies that do reach the postcard decoder: small leading bytes (plausible variant
/// tags and lengths) are over-represented.
fn body() -> impl Strategy<Value = Vec<u8>> {
    vec(prop_oneof![0u8..8, any::<u8>()], 0..200)
}

/// A stream of frames with correct length prefixes around arbitrary bodies, sometimes followed
/// by garbage.
fn framed_stream() -> impl Strategy<Value = Vec<u8>> {
    (vec(body(), 0..4), vec(any::<u8>(), 0..16)).prop_map(|(bodies, tail)| {
        let mut out: Vec<u8> = bodies.iter().flat_map(|b| frame_of(b)).collect();
        out.extend(tail);
        out
    })
}

/// Applies byte edits (position modulo length, new value) and an optional cut to valid bytes.
fn mutate(mut bytes: Vec<u8>, edits: &[(usize, u8)], cut: Option<usize>) -> Vec<u8> {
    if !bytes.is_empty() {
        for &(at, value) in edits {
            let at = at % bytes.len();
            bytes[at] = value;
        }
    }
    if let Some(cut) = cut {
        bytes.truncate(cut % (bytes.len() + 1));
    }
    bytes
}

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn arbitrary_bytes_never_panic_decode_frame(buf in vec(any::<u8>(), 0..300)) {
        check_decode_all(&buf)?;
    }

    #[test]
    fn arbitrary_bodies_never_panic_decode_frame(body in body(), tail in vec(any::<u8>(), 0..8)) {
        let mut buf = frame_of(&body);
        buf.extend(tail);
        check_decode_all(&buf)?;
    }

    #[test]
    fn arbitrary_bytes_never_panic_frame_decoder(
        stream in prop_oneof![vec(any::<u8>(), 0..300), framed_stream()],
        chunks in vec(1usize..40, 1..6),
    ) {
        check_decoder_agrees_all(&stream, &chunks)?;
    }

    #[test]
    fn arbitrary_bytes_never_panic_datagram_decode(
        buf in prop_oneof![vec(0u8..4, 0..40), vec(any::<u8>(), 0..(MAX_DATAGRAM_LEN + 64))],
    ) {
        match Datagram::decode(&buf) {
            Ok(dg) => prop_assert_eq!(Datagram::decode(&dg.encode()?)?, dg),
            Err(FrameError::TooLarge { len, max }) => {
                prop_assert!(buf.len() > MAX_DATAGRAM_LEN);
                prop_assert_eq!((len, max), (buf.len(), MAX_DATAGRAM_LEN));
            }
            Err(e) => prop_assert_eq!(e.code(), ErrorCode::BadFrame, "{:?}", e),
        }
    }
}

/// Valid frames with bytes overwritten and cut short: these reach deep into every decoder.
macro_rules! mutation_suite {
    ($($name:ident: $ty:ty),* $(,)?) => {$(
        proptest! {
            #![proptest_config(config(256))]

            #[test]
            fn $name(
                msgs in vec(any::<$ty>(), 1..3),
                edits in vec((any::<usize>(), any::<u8>()), 0..4),
                cut in proptest::option::of(any::<usize>()),
                chunks in vec(1usize..40, 1..4),
            ) {
                let mut stream = Vec::new();
                for m in &msgs {
                    stream.extend(encode_frame(m)?);
                }
                let stream = mutate(stream, &edits, cut);
                check_decode_all(&stream)?;
                check_decoder_agrees_all(&stream, &chunks)?;
                let payload = mutate(postcard::to_stdvec(&msgs[0])?, &edits, cut);
                if let Ok(dg) = Datagram::decode(&payload) {
                    prop_assert_eq!(Datagram::decode(&dg.encode()?)?, dg);
                }
            }
        }
    )*};
}

mutation_suite! {
    mutated_bootstrap_request: BootstrapRequest,
    mutated_bootstrap_response: BootstrapResponse,
    mutated_control_up: ControlUp,
    mutated_control_down: ControlDown,
    mutated_invoke_request: InvokeRequest,
    mutated_invoke_reply: InvokeReply,
    mutated_datagram: Datagram,
    mutated_relay: crate::peer::Relay,
    mutated_peer_open: crate::peer::PeerOpen,
}

fn header(len: u32) -> [u8; HEADER_LEN] {
    len.to_be_bytes()
}

fn too_large() -> FrameError {
    FrameError::TooLarge {
        len: MAX_FRAME_LEN + 1,
        max: MAX_FRAME_LEN,
    }
}

#[test]
fn oversize_header_is_refused_before_any_body_byte() {
    let announced = u32::try_from(MAX_FRAME_LEN + 1).unwrap();
    assert_eq!(
        decode_frame::<ControlUp>(&header(announced)),
        Err(too_large())
    );
    assert_eq!(too_large().code(), ErrorCode::FrameTooLarge);

    let mut dec = FrameDecoder::default();
    assert_eq!(dec.push(&header(announced)), Err(too_large()));
    assert_eq!(
        dec.buffered(),
        0,
        "nothing is kept once the header is refused"
    );
    // The body that follows is never buffered, and the decoder stays failed.
    assert!(dec.push(&[0u8; 4096]).is_err());
    assert_eq!(dec.buffered(), 0);
    assert!(dec.next::<ControlUp>().is_err());

    // Also when the header arrives one byte at a time.
    let mut dec = FrameDecoder::default();
    let h = header(u32::MAX);
    for b in &h[..3] {
        assert_eq!(dec.push(&[*b]), Ok(()));
    }
    assert_eq!(
        dec.push(&h[3..]),
        Err(FrameError::TooLarge {
            len: u32::MAX as usize,
            max: MAX_FRAME_LEN
        })
    );
    assert_eq!(dec.buffered(), 0);
}

#[test]
fn a_header_at_the_limit_waits_for_its_body() {
    let announced = u32::try_from(MAX_FRAME_LEN).unwrap();
    assert_eq!(
        decode_frame::<ControlUp>(&header(announced)),
        Ok(Decoded::NeedMore {
            at_least: HEADER_LEN + MAX_FRAME_LEN
        })
    );
    let mut dec = FrameDecoder::default();
    assert_eq!(dec.push(&header(announced)), Ok(()));
    assert_eq!(dec.next::<ControlUp>(), Ok(None));
}

#[test]
fn custom_limits_apply_to_both_directions() {
    let msg = ControlDown::RenewRefused(crate::control::RenewRefused {
        message: "x".repeat(10),
    });
    let frame = encode_frame(&msg).unwrap();
    let body = frame.len() - HEADER_LEN;
    assert_eq!(
        encode_frame_with_limit(&msg, body - 1),
        Err(FrameError::TooLarge {
            len: body,
            max: body - 1
        })
    );
    assert_eq!(encode_frame_with_limit(&msg, body).unwrap(), frame);
    assert_eq!(
        decode_frame_with_limit::<ControlDown>(&frame, body - 1),
        Err(FrameError::TooLarge {
            len: body,
            max: body - 1
        })
    );
    let mut dec = FrameDecoder::new(body - 1);
    assert!(matches!(dec.push(&frame), Err(FrameError::TooLarge { .. })));
    let mut dec = FrameDecoder::new(body);
    dec.push(&frame).unwrap();
    assert_eq!(dec.next::<ControlDown>(), Ok(Some(msg)));
}

#[test]
fn a_truncated_frame_needs_more_bytes() {
    let frame = encode_frame(&InvokeReply::Progress(crate::invoke::Progress {
        message: "working".into(),
        percent: Some(10),
    }))
    .unwrap();
    for cut in 0..frame.len() {
        let expected = if cut < HEADER_LEN {
            HEADER_LEN
        } else {
            frame.len()
        };
        assert_eq!(
            decode_frame::<InvokeReply>(&frame[..cut]),
            Ok(Decoded::NeedMore { at_least: expected }),
            "cut at {cut}"
        );
    }
    let mut dec = FrameDecoder::default();
    dec.push(&frame[..frame.len() - 1]).unwrap();
    assert_eq!(dec.next::<InvokeReply>(), Ok(None));
    assert_eq!(dec.buffered(), frame.len() - 1, "a partial frame is kept");
    dec.push(&frame[frame.len() - 1..]).unwrap();
    assert!(dec.next::<InvokeReply>().unwrap().is_some());
    assert_eq!(dec.buffered(), 0);
}

#[test]
fn bytes_after_a_frame_belong_to_the_next_frame() {
    let frame = encode_frame(&ControlDown::RotateNow).unwrap();
    let mut buf = frame.clone();
    buf.extend([0xff, 0xff]);
    assert_eq!(
        decode_frame::<ControlDown>(&buf),
        Ok(Decoded::Frame {
            msg: ControlDown::RotateNow,
            consumed: frame.len()
        })
    );
}

#[test]
fn trailing_bytes_inside_a_body_are_refused() {
    let mut body = postcard::to_stdvec(&ControlDown::RotateNow).unwrap();
    body.extend([0, 0, 0]);
    let err = decode_frame::<ControlDown>(&frame_of(&body)).unwrap_err();
    assert_eq!(err, FrameError::TrailingBytes(3));
    assert_eq!(err.code(), ErrorCode::BadFrame);

    let mut dec = FrameDecoder::default();
    dec.push(&frame_of(&body)).unwrap();
    assert_eq!(dec.next::<ControlDown>(), Err(FrameError::TrailingBytes(3)));
    assert_eq!(dec.buffered(), 0);

    let mut payload = crate::datagram::Datagram::HeartbeatAck(crate::datagram::HeartbeatAck {
        seq: 1,
        echo_node_time_ms: 2,
        received: 3,
    })
    .encode()
    .unwrap();
    payload.push(0);
    assert_eq!(
        Datagram::decode(&payload),
        Err(FrameError::TrailingBytes(1))
    );
}

fn malformed<T: Message>(body: &[u8]) {
    match decode_frame::<T>(&frame_of(body)) {
        Err(e @ FrameError::Malformed(_)) => assert_eq!(e.code(), ErrorCode::BadFrame),
        other => panic!(
            "{} body {body:02x?}: expected Malformed, got {other:?}",
            std::any::type_name::<T>()
        ),
    }
}

#[test]
fn unknown_variants_are_malformed() {
    // The first index past the last variant of every top-level enum.
    malformed::<BootstrapRequest>(&[4]);
    malformed::<BootstrapResponse>(&[5]);
    malformed::<ControlUp>(&[3]);
    malformed::<ControlDown>(&[5]);
    malformed::<InvokeReply>(&[2]);
    malformed::<Datagram>(&[2]);
    assert!(matches!(
        Datagram::decode(&[2]),
        Err(FrameError::Malformed(_))
    ));
    // Far past the end, and a varint index wider than u32.
    malformed::<ControlDown>(&[0xff, 0xff, 0xff, 0xff, 0x0f]);
    malformed::<ControlDown>(&[0xff, 0xff, 0xff, 0xff, 0xff, 0x01]);
    // Nested enums: NodeEvent index 2, PairFailure index 14, Outcome index 7.
    malformed::<ControlUp>(&[1, 2]);
    malformed::<BootstrapResponse>(&[4, 14, 0]);
    malformed::<InvokeReply>(&[1, 7, 0, 0, 0, 0]);
}

#[test]
fn bad_primitive_encodings_are_malformed() {
    // Empty body: no message is zero bytes long.
    malformed::<ControlDown>(&[]);
    // bool other than 0 or 1 (Result.truncated).
    malformed::<InvokeReply>(&[1, 0, 0, 2, 0, 0]);
    // Option tag other than 0 or 1 (Result.error).
    malformed::<InvokeReply>(&[1, 0, 0, 0, 2, 0]);
    // Invalid UTF-8 in a string (Stopping.reason).
    malformed::<ControlUp>(&[1, 0, 2, 0xc3, 0x28]);
    // A string length longer than the body (Stopping.reason).
    malformed::<ControlUp>(&[1, 0, 0x7f, b'a']);
    // A byte-vector length that would not fit in memory (RenewRequest.csr_der).
    malformed::<ControlUp>(&[
        2, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01,
    ]);
    // A u16 varint over 16 bits (Register.version).
    malformed::<ControlUp>(&[0, 0xff, 0xff, 0x04]);
    // A fixed MAC cut short.
    malformed::<BootstrapRequest>(&[1; 20]);
}

#[test]
fn a_failed_decoder_stays_failed() {
    let mut dec = FrameDecoder::default();
    dec.push(&frame_of(&[9])).unwrap();
    assert!(matches!(
        dec.next::<ControlUp>(),
        Err(FrameError::Malformed(_))
    ));
    assert_eq!(dec.buffered(), 0);
    let good = encode_frame(&ControlDown::RotateNow).unwrap();
    assert!(
        dec.push(&good).is_err(),
        "the stream is out of sync; it must be closed"
    );
    assert!(dec.next::<ControlDown>().is_err());
    assert_eq!(dec.buffered(), 0);
}

/// A reader that pushes several chunks before draining must still refuse an oversize frame as
/// soon as its header arrives, not after buffering its body behind the frames in front of it.
#[test]
fn an_oversize_header_behind_other_frames_is_refused_at_push() {
    let good = encode_frame(&ControlDown::RotateNow).unwrap();
    let announced = u32::try_from(MAX_FRAME_LEN + 1).unwrap();
    let mut dec = FrameDecoder::default();
    dec.push(&good).unwrap();
    dec.push(&good[..2]).unwrap();
    dec.push(&good[2..]).unwrap();
    assert_eq!(dec.push(&header(announced)), Err(too_large()));
    assert_eq!(dec.buffered(), 0);

    // Draining as usual gives the good frames first, then the error.
    let mut dec = FrameDecoder::default();
    let mut stream = good.clone();
    stream.extend(header(announced));
    assert_eq!(dec.push(&stream), Err(too_large()));
    let mut dec = FrameDecoder::default();
    dec.push(&good).unwrap();
    assert_eq!(dec.next::<ControlDown>(), Ok(Some(ControlDown::RotateNow)));
    assert_eq!(dec.push(&header(announced)), Err(too_large()));
}

#[test]
fn oversize_datagrams_are_refused_unread() {
    let payload = vec![0u8; MAX_DATAGRAM_LEN + 1];
    assert_eq!(
        Datagram::decode(&payload),
        Err(FrameError::TooLarge {
            len: MAX_DATAGRAM_LEN + 1,
            max: MAX_DATAGRAM_LEN
        })
    );
}
