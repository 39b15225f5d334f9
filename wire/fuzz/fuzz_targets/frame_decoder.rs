//! Fuzzes every decoder of `anchorage-wire` with the same input.
//!
//! The first input byte picks the chunk size (1..=256) used to feed the rest to a
//! [`FrameDecoder`], so one corpus explores both the framing state machine and where reads
//! happen to split. The rest also goes to `decode_frame` for every message type and to
//! `Datagram::decode`. Besides "never panics", it checks the answers are coherent: a decoded
//! message re-encodes to an equal message, "need more" asks for more than there is, and the
//! incremental decoder agrees with decoding the whole buffer at once.

#![no_main]

use std::fmt::Debug;

use anchorage_wire::{
    Decoded, FrameDecoder, FrameError,
    bootstrap::{BootstrapRequest, BootstrapResponse},
    control::{ControlDown, ControlUp},
    datagram::Datagram,
    decode_frame, encode_frame,
    frame::HEADER_LEN,
    invoke::{InvokeReply, InvokeRequest},
    limits::{MAX_DATAGRAM_LEN, MAX_FRAME_LEN},
};
use libfuzzer_sys::fuzz_target;
use serde::{Serialize, de::DeserializeOwned};

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(first) + 1;
    check::<BootstrapRequest>(rest, chunk);
    check::<BootstrapResponse>(rest, chunk);
    check::<ControlUp>(rest, chunk);
    check::<ControlDown>(rest, chunk);
    check::<InvokeRequest>(rest, chunk);
    check::<InvokeReply>(rest, chunk);
    check::<Datagram>(rest, chunk);
    check_datagram(rest);
});

fn check<T>(bytes: &[u8], chunk: usize)
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    // One frame from the front of the whole buffer.
    match decode_frame::<T>(bytes) {
        Ok(Decoded::Frame { msg, consumed }) => {
            assert!(consumed >= HEADER_LEN && consumed <= bytes.len());
            let again = encode_frame(&msg).expect("a decoded message re-encodes");
            assert!(
                again.len() <= consumed,
                "canonical encoding is never longer"
            );
            match decode_frame::<T>(&again) {
                Ok(Decoded::Frame { msg: back, .. }) => assert_eq!(back, msg),
                other => panic!("re-encoded frame did not decode: {other:?}"),
            }
        }
        Ok(Decoded::NeedMore { at_least }) => {
            assert!(at_least > bytes.len());
            assert!(at_least <= HEADER_LEN + MAX_FRAME_LEN);
        }
        Err(FrameError::Encode(e)) => panic!("decoding reported an encode error: {e}"),
        Err(_) => {}
    }

    // Every frame of the buffer, walking the slice.
    let mut walked = Vec::new();
    let mut walk_failed = false;
    let mut rest = bytes;
    loop {
        match decode_frame::<T>(rest) {
            Ok(Decoded::Frame { msg, consumed }) => {
                walked.push(msg);
                rest = &rest[consumed..];
            }
            Ok(Decoded::NeedMore { .. }) => break,
            Err(_) => {
                walk_failed = true;
                break;
            }
        }
    }

    // The same buffer through the incremental decoder, `chunk` bytes per read.
    let mut dec = FrameDecoder::default();
    let mut taken = Vec::new();
    let mut failed = false;
    'feed: for piece in bytes.chunks(chunk) {
        if dec.push(piece).is_err() {
            failed = true;
            break;
        }
        loop {
            match dec.next::<T>() {
                Ok(Some(msg)) => taken.push(msg),
                Ok(None) => break,
                Err(_) => {
                    failed = true;
                    break 'feed;
                }
            }
        }
    }
    if failed {
        assert_eq!(dec.buffered(), 0, "a failed decoder drops its buffer");
        assert!(
            dec.push(b"x").is_err() && dec.next::<T>().is_err(),
            "failure is final"
        );
        assert!(
            walk_failed,
            "the decoder refused what the slice walk accepted"
        );
        assert!(walked.starts_with(&taken));
    } else {
        assert!(
            !walk_failed,
            "the decoder accepted what the slice walk refused"
        );
        assert_eq!(taken, walked);
    }
}

fn check_datagram(bytes: &[u8]) {
    match Datagram::decode(bytes) {
        Ok(dg) => {
            let again = dg.encode().expect("a decoded datagram re-encodes");
            assert_eq!(
                Datagram::decode(&again).expect("re-encoded datagram decodes"),
                dg
            );
        }
        Err(FrameError::TooLarge { .. }) => assert!(bytes.len() > MAX_DATAGRAM_LEN),
        Err(FrameError::Encode(e)) => panic!("decoding reported an encode error: {e}"),
        Err(_) => {}
    }
}
