//! `validate` refuses every over-long field, naming it; a message at every limit is accepted and
//! still fits in one frame.

use crate::{LimitError, bootstrap::*, control::*, encode_frame, invoke::*, limits::*};

fn text(n: usize) -> String {
    "x".repeat(n)
}

fn bytes(n: usize) -> Vec<u8> {
    vec![0xee; n]
}

/// `make(n)` builds a message whose field `field` is `n` long; the message must be accepted at
/// `max` and refused with exactly this field at `max + 1`.
fn check_limit(field: &str, max: usize, make: impl Fn(usize) -> Result<(), LimitError>) {
    assert_eq!(
        make(max),
        Ok(()),
        "`{field}` at its limit {max} must be accepted"
    );
    assert_eq!(make(0), Ok(()), "`{field}` empty must be accepted");
    let err = make(max + 1).expect_err(field);
    assert_eq!(err.field, field);
    assert_eq!(err.len, max + 1);
    assert_eq!(err.max, max);
    assert!(err.to_string().contains(field), "{err}");
}

fn hello(code_id: usize, spake: usize) -> BootstrapRequest {
    BootstrapRequest::Hello(PairHello {
        version: 1,
        code_id: text(code_id),
        spake_msg: bytes(spake),
    })
}

fn csr(der: usize, name: usize, platform: usize) -> BootstrapRequest {
    BootstrapRequest::Csr(CsrSubmit {
        csr_der: bytes(der),
        device_name: text(name),
        platform: text(platform),
        mac: [0; MAC_LEN],
    })
}

fn resume(id: usize) -> BootstrapRequest {
    BootstrapRequest::Resume(PairResume {
        version: 1,
        request_id: text(id),
        proof: [0; MAC_LEN],
    })
}

fn challenge(spake: usize) -> BootstrapResponse {
    BootstrapResponse::Challenge(PairChallenge {
        version: 1,
        spake_msg: bytes(spake),
    })
}

fn pending(id: usize, sas: usize) -> BootstrapResponse {
    BootstrapResponse::Pending(PairPending {
        request_id: text(id),
        sas: text(sas),
        expires_at_ms: u64::MAX,
    })
}

fn approved(device_id: usize, cert: usize, ca: usize) -> BootstrapResponse {
    BootstrapResponse::Approved(PairApproved {
        device_id: text(device_id),
        cert_der: bytes(cert),
        ca_der: bytes(ca),
        mac: [0; MAC_LEN],
    })
}

fn pair_failed(message: usize) -> BootstrapResponse {
    BootstrapResponse::Failed(PairFailed {
        reason: PairFailure::Internal,
        message: text(message),
    })
}

fn capability(name: usize, reason: Option<usize>, description: usize) -> CapabilityInfo {
    CapabilityInfo {
        name: text(name),
        available: reason.is_none(),
        reason: reason.map(text),
        description: text(description),
    }
}

fn register(name: usize, platform: usize, agent: usize, caps: Vec<CapabilityInfo>) -> ControlUp {
    ControlUp::Register(Register {
        version: 1,
        name: text(name),
        platform: text(platform),
        agent_version: text(agent),
        capabilities: caps,
    })
}

fn registered(device_id: usize) -> ControlDown {
    ControlDown::Registered(Registered {
        version: 1,
        heartbeat_interval_ms: u32::MAX,
        anchor_time_ms: u64::MAX,
        device_id: text(device_id),
    })
}

fn renewed(cert: usize, ca: usize) -> ControlDown {
    ControlDown::Renewed(Renewed {
        cert_der: bytes(cert),
        ca_der: bytes(ca),
    })
}

fn invoke(capability: usize, input: usize) -> InvokeRequest {
    InvokeRequest {
        version: 1,
        id: InvocationId([0xff; 16]),
        capability: text(capability),
        input: bytes(input),
        remaining_ms: u32::MAX,
        output_limit: u32::MAX,
    }
}

fn invoke_result(output: usize, error: Option<usize>) -> InvokeReply {
    InvokeReply::Result(InvokeResult {
        outcome: Outcome::Failed,
        output: bytes(output),
        truncated: true,
        error: error.map(text),
        duration_ms: u32::MAX,
    })
}

#[test]
fn bootstrap_request_limits() {
    check_limit("code_id", MAX_CODE_ID_LEN, |n| hello(n, 0).validate());
    check_limit("spake_msg", MAX_SPAKE_LEN, |n| hello(0, n).validate());
    check_limit("csr_der", MAX_CERT_LEN, |n| csr(n, 0, 0).validate());
    check_limit("device_name", MAX_NAME_LEN, |n| csr(0, n, 0).validate());
    check_limit("platform", MAX_NAME_LEN, |n| csr(0, 0, n).validate());
    check_limit("request_id", MAX_NAME_LEN, |n| resume(n).validate());
}

#[test]
fn bootstrap_response_limits() {
    check_limit("spake_msg", MAX_SPAKE_LEN, |n| challenge(n).validate());
    check_limit("request_id", MAX_NAME_LEN, |n| pending(n, 0).validate());
    check_limit("sas", MAX_NAME_LEN, |n| pending(0, n).validate());
    check_limit("device_id", MAX_NAME_LEN, |n| approved(n, 0, 0).validate());
    check_limit("cert_der", MAX_CERT_LEN, |n| approved(0, n, 0).validate());
    check_limit("ca_der", MAX_CERT_LEN, |n| approved(0, 0, n).validate());
    check_limit("message", MAX_TEXT_LEN, |n| pair_failed(n).validate());
}

#[test]
fn control_up_limits() {
    check_limit("name", MAX_NAME_LEN, |n| {
        register(n, 0, 0, vec![]).validate()
    });
    check_limit("platform", MAX_NAME_LEN, |n| {
        register(0, n, 0, vec![]).validate()
    });
    check_limit("agent_version", MAX_NAME_LEN, |n| {
        register(0, 0, n, vec![]).validate()
    });
    check_limit("capabilities", MAX_CAPABILITIES, |n| {
        register(0, 0, 0, vec![capability(1, None, 0); n]).validate()
    });
    // A capability's fields are checked inside Register (any position in the list) ...
    check_limit("capability.name", MAX_NAME_LEN, |n| {
        register(
            0,
            0,
            0,
            vec![capability(1, None, 0), capability(n, None, 0)],
        )
        .validate()
    });
    check_limit("capability.reason", MAX_TEXT_LEN, |n| {
        register(0, 0, 0, vec![capability(1, Some(n), 0)]).validate()
    });
    check_limit("capability.description", MAX_TEXT_LEN, |n| {
        register(0, 0, 0, vec![capability(1, None, n)]).validate()
    });
    // ... and in a capability change event.
    let changed = |c| ControlUp::Event(NodeEvent::CapabilityChanged(c)).validate();
    check_limit("capability.name", MAX_NAME_LEN, |n| {
        changed(capability(n, None, 0))
    });
    check_limit("capability.reason", MAX_TEXT_LEN, |n| {
        changed(capability(0, Some(n), 0))
    });
    check_limit("capability.description", MAX_TEXT_LEN, |n| {
        changed(capability(0, None, n))
    });
    check_limit("reason", MAX_TEXT_LEN, |n| {
        ControlUp::Event(NodeEvent::Stopping { reason: text(n) }).validate()
    });
    check_limit("csr_der", MAX_CERT_LEN, |n| {
        ControlUp::Renew(RenewRequest { csr_der: bytes(n) }).validate()
    });
}

#[test]
fn control_down_limits() {
    check_limit("device_id", MAX_NAME_LEN, |n| registered(n).validate());
    check_limit("cert_der", MAX_CERT_LEN, |n| renewed(n, 0).validate());
    check_limit("ca_der", MAX_CERT_LEN, |n| renewed(0, n).validate());
    check_limit("message", MAX_TEXT_LEN, |n| {
        ControlDown::RenewRefused(RenewRefused { message: text(n) }).validate()
    });
    check_limit("anchors", MAX_ANCHORS, |n| {
        ControlDown::Anchors(AnchorList {
            addrs: vec!["a:1".into(); n],
        })
        .validate()
    });
    let revoked = |devices: Vec<String>, serials: Vec<Vec<u8>>| {
        ControlDown::Revoked(RevokedList {
            replace: false,
            devices,
            serials,
        })
        .validate()
    };
    check_limit("revoked.devices", MAX_REVOKED, |n| {
        revoked(vec!["d".into(); n], vec![])
    });
    check_limit("revoked.serials", MAX_REVOKED, |n| {
        revoked(vec![], vec![vec![1]; n])
    });
    check_limit("revoked.device", MAX_NAME_LEN, |n| {
        revoked(vec![text(n)], vec![])
    });
    check_limit("revoked.serial", MAX_SERIAL_LEN, |n| {
        revoked(vec![], vec![bytes(n)])
    });
    check_limit("anchor", MAX_NAME_LEN, |n| {
        ControlDown::Anchors(AnchorList {
            addrs: vec![text(n)],
        })
        .validate()
    });
}

#[test]
fn peer_limits() {
    use crate::peer::*;
    check_limit("candidates", MAX_CANDIDATES, |n| {
        ControlUp::Candidates(Candidates {
            addrs: vec!["1.2.3.4:5".into(); n],
        })
        .validate()
    });
    check_limit("services", MAX_SERVICES, |n| {
        ControlUp::Services(ServiceList {
            names: vec!["ssh".into(); n],
        })
        .validate()
    });
    check_limit("directory.peers", MAX_DIRECTORY_CHUNK, |n| {
        directory(vec![peer_entry(0); n]).validate()
    });
    check_limit("grant.capabilities", MAX_GRANT_PATTERNS, |n| {
        let mut p = peer_entry(0);
        p.inbound.capabilities = vec!["*".into(); n];
        directory(vec![p]).validate()
    });
    check_limit("packet", MAX_RELAY_PACKET, |n| {
        Relay::Packet(RelayPacket {
            peer: crate::DeviceId::from_bytes([0; 20]),
            packet: bytes(n),
        })
        .validate()
    });
    check_limit("service", MAX_SERVICE_LEN, |n| {
        PeerOpen::Tunnel(TunnelOpen { service: text(n) }).validate()
    });
}

fn directory(peers: Vec<crate::peer::PeerEntry>) -> ControlDown {
    ControlDown::Directory(crate::peer::Directory {
        replace: true,
        policy_version: u64::MAX,
        total: u32::MAX,
        peers,
    })
}

/// A directory entry with every field `n` long (0: empty), or at its limit with `usize::MAX`.
fn peer_entry(n: usize) -> crate::peer::PeerEntry {
    use crate::peer::*;
    let full = n == usize::MAX;
    let pick = |limit: usize| if full { limit } else { n.min(limit) };
    let grant = Grant {
        capabilities: vec![text(pick(MAX_NAME_LEN)); pick(MAX_GRANT_PATTERNS)],
        services: vec![text(pick(MAX_NAME_LEN)); pick(MAX_GRANT_PATTERNS)],
    };
    PeerEntry {
        device_id: crate::DeviceId::from_bytes([0xff; 20]),
        name: text(pick(MAX_NAME_LEN)),
        labels: vec![
            (text(pick(MAX_LABEL_KEY_LEN)), text(pick(MAX_NAME_LEN)));
            pick(crate::labels::MAX_LABELS)
        ],
        services: vec![text(pick(MAX_SERVICE_LEN)); pick(MAX_SERVICES)],
        outbound: grant.clone(),
        inbound: grant,
    }
}

#[test]
fn invoke_limits() {
    check_limit("capability", MAX_NAME_LEN, |n| invoke(n, 0).validate());
    check_limit("input", MAX_INVOKE_INPUT, |n| invoke(0, n).validate());
    check_limit("message", MAX_TEXT_LEN, |n| {
        InvokeReply::Progress(Progress {
            message: text(n),
            percent: None,
        })
        .validate()
    });
    check_limit("output", MAX_INVOKE_OUTPUT, |n| {
        invoke_result(n, None).validate()
    });
    check_limit("error", MAX_TEXT_LEN * 8, |n| {
        invoke_result(0, Some(n)).validate()
    });
}

#[test]
fn fixed_size_messages_always_validate() {
    let confirm = KeyConfirm {
        mac: [0xff; MAC_LEN],
    };
    assert_eq!(
        BootstrapRequest::Confirm(confirm.clone()).validate(),
        Ok(())
    );
    assert_eq!(BootstrapResponse::Confirm(confirm).validate(), Ok(()));
    let renewal_only = RenewalOnly {
        grace_ends_ms: u64::MAX,
    };
    assert_eq!(ControlDown::RenewalOnly(renewal_only).validate(), Ok(()));
    assert_eq!(ControlDown::RotateNow.validate(), Ok(()));
}

#[test]
fn the_first_field_over_its_limit_is_reported() {
    let err = csr(MAX_CERT_LEN + 1, MAX_NAME_LEN + 1, 0)
        .validate()
        .expect_err("two fields over");
    assert_eq!(err.field, "csr_der");
}

/// Every message that passes `validate` must be sendable: the largest valid message of each kind
/// (every field at its limit, integers at their widest varint) fits in one frame.
#[test]
fn largest_valid_messages_fit_in_a_frame() {
    fn fits<T: serde::Serialize + std::fmt::Debug>(what: &str, valid: bool, msg: &T) {
        assert!(valid, "{what} must validate");
        let frame = encode_frame(msg).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert!(frame.len() - 4 <= MAX_FRAME_LEN, "{what}");
    }
    let m = hello(MAX_CODE_ID_LEN, MAX_SPAKE_LEN);
    fits("Hello", m.validate().is_ok(), &m);
    let m = csr(MAX_CERT_LEN, MAX_NAME_LEN, MAX_NAME_LEN);
    fits("Csr", m.validate().is_ok(), &m);
    let m = resume(MAX_NAME_LEN);
    fits("Resume", m.validate().is_ok(), &m);
    let m = pending(MAX_NAME_LEN, MAX_NAME_LEN);
    fits("Pending", m.validate().is_ok(), &m);
    let m = approved(MAX_NAME_LEN, MAX_CERT_LEN, MAX_CERT_LEN);
    fits("Approved", m.validate().is_ok(), &m);
    let m = pair_failed(MAX_TEXT_LEN);
    fits("Failed", m.validate().is_ok(), &m);
    let widest = capability(MAX_NAME_LEN, Some(MAX_TEXT_LEN), MAX_TEXT_LEN);
    let m = register(
        MAX_NAME_LEN,
        MAX_NAME_LEN,
        MAX_NAME_LEN,
        vec![widest; MAX_CAPABILITIES],
    );
    fits("Register", m.validate().is_ok(), &m);
    let m = registered(MAX_NAME_LEN);
    fits("Registered", m.validate().is_ok(), &m);
    let m = directory(vec![
        peer_entry(usize::MAX);
        crate::peer::MAX_DIRECTORY_CHUNK
    ]);
    fits("Directory", m.validate().is_ok(), &m);
    let m = renewed(MAX_CERT_LEN, MAX_CERT_LEN);
    fits("Renewed", m.validate().is_ok(), &m);
    let m = invoke(MAX_NAME_LEN, MAX_INVOKE_INPUT);
    fits("InvokeRequest", m.validate().is_ok(), &m);
    let m = invoke_result(MAX_INVOKE_OUTPUT, Some(MAX_TEXT_LEN * 8));
    fits("InvokeResult", m.validate().is_ok(), &m);
}

#[test]
fn largest_datagrams_fit() {
    use crate::datagram::{Datagram, Heartbeat, HeartbeatAck};
    let heartbeat = Datagram::Heartbeat(Heartbeat {
        seq: u64::MAX,
        node_time_ms: u64::MAX,
        load_centi: Some(u32::MAX),
        running: u16::MAX,
    });
    let ack = Datagram::HeartbeatAck(HeartbeatAck {
        seq: u64::MAX,
        echo_node_time_ms: u64::MAX,
        received: u64::MAX,
    });
    for dg in [heartbeat, ack] {
        let bytes = dg.encode().unwrap();
        // Well inside one 1200-byte QUIC packet, with room for appended fields.
        assert!(bytes.len() <= 64, "{dg:?} is {} bytes", bytes.len());
        assert_eq!(Datagram::decode(&bytes).unwrap(), dg);
    }
}
