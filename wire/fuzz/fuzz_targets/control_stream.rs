//! Fuzzes what the anchor does with the bytes of a node's control stream and datagrams.
//!
//! The input is fed, in chunks the first byte picks, to a `FrameDecoder` of `ControlUp`s, as
//! the anchor reads a node's control stream; every message that decodes is checked against
//! the protocol limits and re-encoded. The same bytes are also cut into datagrams (the
//! second byte picks their length) and decoded as the anchor decodes a node's datagrams;
//! the sequence numbers of the heartbeats among them go into a `LossWindow`, whose counters
//! must stay within what the window allows however the numbers jump. Nothing may panic.

#![no_main]

use anchorage_mesh::presence::LossWindow;
use anchorage_wire::{
    Decoded, FrameDecoder, control::ControlUp, datagram::Datagram, decode_frame, encode_frame,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let [first, second, rest @ ..] = data else {
        return;
    };
    let chunk = usize::from(*first) + 1;
    let mut dec = FrameDecoder::default();
    'feed: for piece in rest.chunks(chunk) {
        if dec.push(piece).is_err() {
            break;
        }
        loop {
            match dec.next::<ControlUp>() {
                Ok(Some(msg)) => {
                    let _ = msg.validate();
                    let again = encode_frame(&msg).expect("a decoded message re-encodes");
                    match decode_frame::<ControlUp>(&again) {
                        Ok(Decoded::Frame { msg: back, .. }) => assert_eq!(back, msg),
                        other => panic!("re-encoded frame did not decode: {other:?}"),
                    }
                }
                Ok(None) => break,
                Err(_) => break 'feed,
            }
        }
    }

    let mut window = LossWindow::default();
    let mut heartbeats = 0u64;
    for dg in rest.chunks(usize::from(*second) + 1) {
        if let Ok(Datagram::Heartbeat(hb)) = Datagram::decode(dg) {
            heartbeats += 1;
            window.record(hb.seq);
            let _ = window.loss();
        }
    }
    assert!(window.received <= heartbeats);
    assert!(
        window.lost <= heartbeats.saturating_mul(LossWindow::SPAN),
        "each heartbeat adds at most one window of loss"
    );
});
