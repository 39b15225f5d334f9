//! Golden bytes: the exact encoding of hand-built messages of every stream.
//!
//! If one of these fails, the wire format changed. That is only acceptable for an appended
//! variant or field that a new fixture covers; anything else breaks deployed peers and needs a
//! new `PROTOCOL_VERSION` and ALPN (see `docs/protocol.md`, "Versioning").

use super::{Message, hex, unhex};
use crate::{
    Decoded, DeviceId, bootstrap::*, control::*, datagram::*, decode_frame, encode_frame,
    invoke::*, peer::*,
};

/// Asserts `msg` frames to exactly `expected` (hex, whitespace ignored) and back.
fn assert_frame<T: Message>(msg: &T, expected: &str) {
    let expected = unhex(expected);
    let frame = encode_frame(msg).unwrap();
    assert_eq!(hex(&frame), hex(&expected), "encoding of {msg:?} drifted");
    assert_eq!(
        decode_frame::<T>(&expected).unwrap(),
        Decoded::Frame {
            msg: msg.clone(),
            consumed: expected.len()
        }
    );
}

/// Asserts `dg` encodes to exactly `expected` as a datagram payload and back.
fn assert_datagram(dg: &Datagram, expected: &str) {
    let expected = unhex(expected);
    assert_eq!(
        hex(&dg.encode().unwrap()),
        hex(&expected),
        "encoding of {dg:?} drifted"
    );
    assert_eq!(&Datagram::decode(&expected).unwrap(), dg);
}

// Reading the fixtures: a frame starts with the 4-byte big-endian body length; enum variants are
// a varint index; integers above u8 are LEB128 varints; strings and byte vectors are a varint
// length then the bytes; fixed arrays are bare bytes; `Option` is 00 or 01 + value; `bool` is
// 00 or 01; structs are their fields in declaration order with nothing in between.

#[test]
fn bootstrap_hello() {
    assert_frame(
        &hello(),
        "0000000b    # body length 11
         00          # BootstrapRequest::Hello
         01          # version 1
         04 4b375144 # code_id \"K7QD\"
         03 a1a2a3   # spake_msg, 3 bytes",
    );
}

#[test]
fn bootstrap_confirm_mac_is_bare_32_bytes() {
    assert_frame(
        &confirm(),
        "00000021 # body length 33
         01       # BootstrapRequest::Confirm
         abababababababababababababababababababababababababababababababab # mac, no length",
    );
}

#[test]
fn bootstrap_pending() {
    assert_frame(
        &pending(),
        "00000013      # body length 19
         02            # BootstrapResponse::Pending
         04 70722d31   # request_id \"pr-1\"
         06 303432393137 # sas \"042917\"
         80d095ffbc31  # expires_at_ms 1_700_000_000_000",
    );
}

#[test]
fn bootstrap_failed() {
    assert_frame(
        &failed(),
        "00000005 # body length 5
         04       # BootstrapResponse::Failed
         04       # reason PairFailure::WrongSecret
         02 6e6f  # message \"no\"",
    );
}

#[test]
fn control_register() {
    assert_frame(
        &register(),
        "00000037                      # body length 55
         00                            # ControlUp::Register
         01                            # version 1
         02 7069                       # name \"pi\"
         0d 6c696e75782d61617263683634 # platform \"linux-aarch64\"
         05 302e312e30                 # agent_version \"0.1.0\"
         02                            # 2 capabilities
         04 6563686f                   #   name \"echo\"
         01                            #   available true
         00                            #   reason None
         04 4563686f                   #   description \"Echo\"
         04 6f70656e                   #   name \"open\"
         00                            #   available false
         01 08 686561646c657373        #   reason Some(\"headless\")
         00                            #   description \"\"",
    );
}

#[test]
fn control_stopping() {
    assert_frame(
        &stopping(),
        "00000006  # body length 6
         01        # ControlUp::Event
         00        # NodeEvent::Stopping
         03 627965 # reason \"bye\"",
    );
}

#[test]
fn control_registered() {
    assert_frame(
        &registered(),
        "0000000f     # body length 15
         00           # ControlDown::Registered
         01           # version 1
         9875         # heartbeat_interval_ms 15_000
         80d095ffbc31 # anchor_time_ms 1_700_000_000_000
         04 41424344  # device_id \"ABCD\"",
    );
}

#[test]
fn control_rotate_now_is_a_bare_tag() {
    assert_frame(
        &ControlDown::RotateNow,
        "00000001 # body length 1
         04       # ControlDown::RotateNow, no payload",
    );
}

#[test]
fn invoke_request_is_a_struct_without_tag() {
    assert_frame(
        &invoke_request(),
        "0000001f                         # body length 31
         01                               # version 1 (a struct: no variant tag)
         000102030405060708090a0b0c0d0e0f # id, 16 bare bytes
         04 6563686f                      # capability \"echo\"
         02 7b7d                          # input \"{}\"
         b0ea01                           # remaining_ms 30_000
         808004                           # output_limit 65_536",
    );
}

#[test]
fn invoke_progress() {
    assert_frame(
        &progress(),
        "00000008    # body length 8
         00          # InvokeReply::Progress
         04 68616c66 # message \"half\"
         01 32       # percent Some(50), a u8 is one raw byte",
    );
}

#[test]
fn invoke_result() {
    assert_frame(
        &result(),
        "00000009 # body length 9
         01       # InvokeReply::Result
         00       # outcome Outcome::Succeeded
         02 7b7d  # output \"{}\"
         00       # truncated false
         00       # error None
         ac02     # duration_ms 300",
    );
}

#[test]
fn datagram_heartbeat_has_no_length_prefix() {
    assert_datagram(
        &heartbeat(),
        "00      # Datagram::Heartbeat
         07      # seq 7
         c0c407  # node_time_ms 123_456
         01 9601 # load_centi Some(150)
         02      # running 2",
    );
}

#[test]
fn datagram_invoke_copy() {
    assert_datagram(
        &invoke_copy(),
        "02       # Datagram::InvokeCopy
         01       # version 1
         abababababababababababababababab # id, 16 bare bytes
         04 6563686f # capability \"echo\"
         02 7b7d  # input {}
         e807     # remaining_ms 1000
         808004   # output_limit 65536",
    );
}

#[test]
fn datagram_result_copy() {
    assert_datagram(
        &result_copy(),
        "03       # Datagram::ResultCopy
         abababababababababababababababab # id
         00       # Outcome::Succeeded
         02 7b7d  # output {}
         00       # truncated false
         00       # error None
         03       # duration_ms 3",
    );
}

#[test]
fn datagram_heartbeat_ack() {
    assert_datagram(
        &ack(),
        "01     # Datagram::HeartbeatAck
         07     # seq 7
         c0c407 # echo_node_time_ms 123_456
         08     # received 8",
    );
}

/// The index of every variant of every enum on the wire. The `match`es have no wildcard, so
/// adding a variant does not compile until it is given the next index here; reordering one
/// fails the test.
#[test]
fn variant_indices_are_append_only() {
    fn tag<T: serde::Serialize>(v: &T) -> u8 {
        postcard::to_stdvec(v).unwrap()[0]
    }
    let csr = CsrSubmit {
        csr_der: vec![],
        device_name: String::new(),
        platform: String::new(),
        mac: [0; 32],
    };
    let resume = PairResume {
        version: 1,
        request_id: String::new(),
        proof: [0; 32],
    };
    for m in [
        hello(),
        confirm(),
        BootstrapRequest::Csr(csr),
        BootstrapRequest::Resume(resume),
    ] {
        let expected = match m {
            BootstrapRequest::Hello(_) => 0,
            BootstrapRequest::Confirm(_) => 1,
            BootstrapRequest::Csr(_) => 2,
            BootstrapRequest::Resume(_) => 3,
        };
        assert_eq!(tag(&m), expected, "{m:?}");
    }

    let approved = PairApproved {
        device_id: String::new(),
        cert_der: vec![],
        ca_der: vec![],
        mac: [0; 32],
    };
    let responses = [
        BootstrapResponse::Challenge(PairChallenge {
            version: 1,
            spake_msg: vec![],
        }),
        BootstrapResponse::Confirm(KeyConfirm { mac: [0; 32] }),
        pending(),
        BootstrapResponse::Approved(approved),
        failed(),
    ];
    for m in responses {
        let expected = match m {
            BootstrapResponse::Challenge(_) => 0,
            BootstrapResponse::Confirm(_) => 1,
            BootstrapResponse::Pending(_) => 2,
            BootstrapResponse::Approved(_) => 3,
            BootstrapResponse::Failed(_) => 4,
        };
        assert_eq!(tag(&m), expected, "{m:?}");
    }

    let renew = ControlUp::Renew(RenewRequest { csr_der: vec![] });
    let ups = [
        register(),
        stopping(),
        renew,
        ControlUp::Candidates(Candidates { addrs: vec![] }),
        ControlUp::Services(ServiceList { names: vec![] }),
        ControlUp::Rendezvous(RendezvousRequest {
            peer: DeviceId::from_bytes([0; 20]),
        }),
        ControlUp::Paths(PathReport { paths: vec![] }),
    ];
    for m in ups {
        let expected = match m {
            ControlUp::Register(_) => 0,
            ControlUp::Event(_) => 1,
            ControlUp::Renew(_) => 2,
            ControlUp::Candidates(_) => 3,
            ControlUp::Services(_) => 4,
            ControlUp::Rendezvous(_) => 5,
            ControlUp::Paths(_) => 6,
        };
        assert_eq!(tag(&m), expected, "{m:?}");
    }

    let capability = CapabilityInfo {
        name: String::new(),
        available: true,
        reason: None,
        description: String::new(),
    };
    let events = [
        NodeEvent::Stopping {
            reason: String::new(),
        },
        NodeEvent::CapabilityChanged(capability),
    ];
    for m in events {
        let expected = match m {
            NodeEvent::Stopping { .. } => 0,
            NodeEvent::CapabilityChanged(_) => 1,
        };
        assert_eq!(tag(&m), expected, "{m:?}");
    }

    let downs = [
        registered(),
        ControlDown::RenewalOnly(RenewalOnly { grace_ends_ms: 0 }),
        ControlDown::Renewed(Renewed {
            cert_der: vec![],
            ca_der: vec![],
        }),
        ControlDown::RenewRefused(RenewRefused {
            message: String::new(),
        }),
        ControlDown::RotateNow,
        ControlDown::Anchors(AnchorList { addrs: vec![] }),
        ControlDown::Revoked(RevokedList {
            replace: true,
            devices: vec![],
            serials: vec![],
        }),
        ControlDown::Directory(Directory {
            replace: true,
            policy_version: 0,
            total: 0,
            peers: vec![],
        }),
        ControlDown::Punch(Punch {
            peer: DeviceId::from_bytes([0; 20]),
            addrs: vec![],
            token: [0; 16],
        }),
        ControlDown::Unreachable(Unreachable {
            peer: DeviceId::from_bytes([0; 20]),
            reason: String::new(),
        }),
    ];
    for m in downs {
        let expected = match m {
            ControlDown::Registered(_) => 0,
            ControlDown::RenewalOnly(_) => 1,
            ControlDown::Renewed(_) => 2,
            ControlDown::RenewRefused(_) => 3,
            ControlDown::RotateNow => 4,
            ControlDown::Anchors(_) => 5,
            ControlDown::Revoked(_) => 6,
            ControlDown::Directory(_) => 7,
            ControlDown::Punch(_) => 8,
            ControlDown::Unreachable(_) => 9,
        };
        assert_eq!(tag(&m), expected, "{m:?}");
    }

    for m in [progress(), result()] {
        let expected = match m {
            InvokeReply::Progress(_) => 0,
            InvokeReply::Result(_) => 1,
        };
        assert_eq!(tag(&m), expected, "{m:?}");
    }

    let outcomes = [
        Outcome::Succeeded,
        Outcome::Failed,
        Outcome::TimedOut,
        Outcome::Rejected,
        Outcome::Expired,
        Outcome::Duplicate,
        Outcome::Busy,
    ];
    for m in outcomes {
        let expected = match m {
            Outcome::Succeeded => 0,
            Outcome::Failed => 1,
            Outcome::TimedOut => 2,
            Outcome::Rejected => 3,
            Outcome::Expired => 4,
            Outcome::Duplicate => 5,
            Outcome::Busy => 6,
        };
        assert_eq!(postcard::to_stdvec(&m).unwrap(), [expected], "{m:?}");
    }

    for m in super::codes::ALL_PAIR_FAILURES {
        let expected = match m {
            PairFailure::UnknownCode => 0,
            PairFailure::CodeExpired => 1,
            PairFailure::CodeConsumed => 2,
            PairFailure::CodeBurned => 3,
            PairFailure::WrongSecret => 4,
            PairFailure::Rejected => 5,
            PairFailure::RequestExpired => 6,
            PairFailure::UnknownRequest => 7,
            PairFailure::DeviceRevoked => 8,
            PairFailure::BadCsr => 9,
            PairFailure::UnsupportedVersion => 10,
            PairFailure::ProtocolViolation => 11,
            PairFailure::Overloaded => 12,
            PairFailure::Internal => 13,
        };
        assert_eq!(postcard::to_stdvec(&m).unwrap(), [expected], "{m:?}");
    }

    for m in [heartbeat(), ack(), invoke_copy(), result_copy()] {
        let expected = match m {
            Datagram::Heartbeat(_) => 0,
            Datagram::HeartbeatAck(_) => 1,
            Datagram::InvokeCopy(_) => 2,
            Datagram::ResultCopy(_) => 3,
        };
        assert_eq!(tag(&m), expected, "{m:?}");
    }

    let packet = RelayPacket {
        peer: DeviceId::from_bytes([0; 20]),
        packet: vec![],
    };
    for m in [Relay::Hello, Relay::Packet(packet)] {
        let expected = match m {
            Relay::Hello => 0,
            Relay::Packet(_) => 1,
        };
        assert_eq!(tag(&m), expected, "{m:?}");
    }
    let request = InvokeRequest {
        version: 1,
        id: InvocationId([0; 16]),
        capability: String::new(),
        input: vec![],
        remaining_ms: 0,
        output_limit: 0,
    };
    let opens = [
        PeerOpen::Invoke(request),
        PeerOpen::Tunnel(TunnelOpen {
            service: String::new(),
        }),
    ];
    for m in opens {
        let expected = match m {
            PeerOpen::Invoke(_) => 0,
            PeerOpen::Tunnel(_) => 1,
        };
        assert_eq!(tag(&m), expected, "{m:?}");
    }
    for m in [TunnelReply::Accepted, TunnelReply::Refused(String::new())] {
        let expected = match m {
            TunnelReply::Accepted => 0,
            TunnelReply::Refused(_) => 1,
        };
        assert_eq!(tag(&m), expected, "{m:?}");
    }
    let ping = Ping {
        from: DeviceId::from_bytes([0; 20]),
        token: [0; 16],
        tx: [0; 12],
    };
    let pong = Pong {
        from: DeviceId::from_bytes([0; 20]),
        token: [0; 16],
        tx: [0; 12],
        observed: "127.0.0.1:1".parse().unwrap(),
    };
    for m in [Probe::Ping(ping), Probe::Pong(pong)] {
        let expected = match m {
            Probe::Ping(_) => 0,
            Probe::Pong(_) => 1,
        };
        assert_eq!(tag(&m), expected, "{m:?}");
    }
    for m in [PathKind::Direct, PathKind::Relayed, PathKind::None] {
        let expected = match m {
            PathKind::Direct => 0,
            PathKind::Relayed => 1,
            PathKind::None => 2,
        };
        assert_eq!(tag(&m), expected, "{m:?}");
    }
}

fn hello() -> BootstrapRequest {
    BootstrapRequest::Hello(PairHello {
        version: 1,
        code_id: "K7QD".into(),
        spake_msg: vec![0xa1, 0xa2, 0xa3],
    })
}

fn confirm() -> BootstrapRequest {
    BootstrapRequest::Confirm(KeyConfirm { mac: [0xab; 32] })
}

fn pending() -> BootstrapResponse {
    BootstrapResponse::Pending(PairPending {
        request_id: "pr-1".into(),
        sas: "042917".into(),
        expires_at_ms: 1_700_000_000_000,
    })
}

fn failed() -> BootstrapResponse {
    BootstrapResponse::Failed(PairFailed {
        reason: PairFailure::WrongSecret,
        message: "no".into(),
    })
}

fn register() -> ControlUp {
    ControlUp::Register(Register {
        version: 1,
        name: "pi".into(),
        platform: "linux-aarch64".into(),
        agent_version: "0.1.0".into(),
        capabilities: vec![
            CapabilityInfo {
                name: "echo".into(),
                available: true,
                reason: None,
                description: "Echo".into(),
            },
            CapabilityInfo {
                name: "open".into(),
                available: false,
                reason: Some("headless".into()),
                description: "".into(),
            },
        ],
    })
}

fn stopping() -> ControlUp {
    ControlUp::Event(NodeEvent::Stopping {
        reason: "bye".into(),
    })
}

fn registered() -> ControlDown {
    ControlDown::Registered(Registered {
        version: 1,
        heartbeat_interval_ms: 15_000,
        anchor_time_ms: 1_700_000_000_000,
        device_id: "ABCD".into(),
    })
}

fn invoke_request() -> InvokeRequest {
    InvokeRequest {
        version: 1,
        id: InvocationId([
            0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09, 0x0a, 0x0b, 0x0c, 0x0d,
            0x0e, 0x0f,
        ]),
        capability: "echo".into(),
        input: b"{}".to_vec(),
        remaining_ms: 30_000,
        output_limit: 65_536,
    }
}

fn progress() -> InvokeReply {
    InvokeReply::Progress(Progress {
        message: "half".into(),
        percent: Some(50),
    })
}

fn result() -> InvokeReply {
    InvokeReply::Result(InvokeResult {
        outcome: Outcome::Succeeded,
        output: b"{}".to_vec(),
        truncated: false,
        error: None,
        duration_ms: 300,
    })
}

fn heartbeat() -> Datagram {
    Datagram::Heartbeat(Heartbeat {
        seq: 7,
        node_time_ms: 123_456,
        load_centi: Some(150),
        running: 2,
    })
}

fn invoke_copy() -> Datagram {
    Datagram::InvokeCopy(InvokeRequest {
        version: 1,
        id: InvocationId([0xab; 16]),
        capability: "echo".into(),
        input: b"{}".to_vec(),
        remaining_ms: 1000,
        output_limit: 65536,
    })
}

fn result_copy() -> Datagram {
    Datagram::ResultCopy(ResultCopy {
        id: InvocationId([0xab; 16]),
        result: InvokeResult {
            outcome: Outcome::Succeeded,
            output: b"{}".to_vec(),
            truncated: false,
            error: None,
            duration_ms: 3,
        },
    })
}

fn ack() -> Datagram {
    Datagram::HeartbeatAck(HeartbeatAck {
        seq: 7,
        echo_node_time_ms: 123_456,
        received: 8,
    })
}
