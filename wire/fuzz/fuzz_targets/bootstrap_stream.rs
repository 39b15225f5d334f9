//! Fuzzes what the anchor does with the bytes of a bootstrap (pairing) stream.
//!
//! The input is fed, in chunks the first byte picks, to a `FrameDecoder` of
//! `BootstrapRequest`s, exactly as the anchor reads the stream. Every message that decodes is
//! checked against the protocol limits and re-encoded, and each `Hello` goes through what
//! the anchor does with its untrusted fields: the code id is parsed (and, parsed or not,
//! answered with a SPAKE2 challenge), the node's SPAKE2 message is fed to
//! `anchor_respond`. The rest of the input is also read as a typed PIN and a QR URI, the
//! other untrusted text the pairing path parses. Nothing may panic.

#![no_main]

use anchorage_mesh::pairing::{CodeId, CodeSecret, PinCode, QrPayload, anchor_respond};
use anchorage_wire::{
    FrameDecoder,
    bootstrap::{BootstrapRequest, MAX_SPAKE_LEN},
    encode_frame,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(first) + 1;
    let mut dec = FrameDecoder::default();
    'feed: for piece in rest.chunks(chunk) {
        if dec.push(piece).is_err() {
            break;
        }
        loop {
            match dec.next::<BootstrapRequest>() {
                Ok(Some(msg)) => handle(&msg),
                Ok(None) => break,
                Err(_) => break 'feed,
            }
        }
    }
    if let Ok(text) = std::str::from_utf8(rest) {
        let _ = text.parse::<PinCode>();
        let _ = text.parse::<QrPayload>();
        let _ = text.parse::<CodeId>();
    }
});

fn handle(msg: &BootstrapRequest) {
    let valid = msg.validate().is_ok();
    let again = encode_frame(msg).expect("a decoded message re-encodes");
    assert!(!again.is_empty());
    let BootstrapRequest::Hello(hello) = msg else {
        return;
    };
    if !valid {
        // The anchor refuses it as a bad frame before looking inside.
        return;
    }
    assert!(hello.spake_msg.len() <= MAX_SPAKE_LEN);
    if let Ok(id) = hello.code_id.parse::<CodeId>() {
        assert_eq!(
            id.grouped().parse::<CodeId>().expect("grouped ids parse"),
            id
        );
    }
    let exporter = [7u8; 32];
    let _ = anchor_respond(
        &hello.code_id,
        &CodeSecret::new("123456"),
        &hello.spake_msg,
        &exporter,
    );
}
