//! `anchorctl mesh`: the peer connections of the mesh as the nodes report them.

use time::OffsetDateTime;

use super::format::{Table, millis, or_dash, relative, truncate};
use crate::api::MeshLink;

/// The table of `anchorctl mesh`: A, B, PATH, ADDR, RTT, SINCE.
pub fn human_mesh(links: &[MeshLink], now: OffsetDateTime) -> String {
    if links.is_empty() {
        return "no peer connections reported\n".into();
    }
    let mut t = Table::new(&["A", "B", "PATH", "ADDR", "RTT", "SINCE"]);
    for l in links {
        t.row(vec![
            side(&l.a_name, &l.a.to_string()),
            side(&l.b_name, &l.b.to_string()),
            l.path.clone(),
            or_dash(l.addr.as_deref()),
            millis(l.rtt_ms),
            relative(l.since, now),
        ]);
    }
    t.render()
}

/// `name (id…)`, or the id alone for a device without a name.
fn side(name: &str, id: &str) -> String {
    if name.is_empty() {
        id.to_string()
    } else {
        format!("{name} ({})", truncate(id, 12))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_names_both_sides_and_the_path() {
        let now = OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap();
        let a = anchorage_wire::DeviceId::from_bytes([1; 20]);
        let b = anchorage_wire::DeviceId::from_bytes([2; 20]);
        let link = MeshLink {
            a,
            a_name: "display".into(),
            b,
            b_name: String::new(),
            path: "direct".into(),
            addr: Some("10.0.0.2:7445".into()),
            rtt_ms: Some(4.2),
            since: now - time::Duration::minutes(3),
        };
        let text = human_mesh(&[link], now);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("A "), "{text}");
        for header in ["B", "PATH", "ADDR", "RTT", "SINCE"] {
            assert!(lines[0].contains(header), "{text}");
        }
        assert!(lines[1].starts_with("display ("), "{text}");
        assert!(lines[1].contains(&b.to_string()), "{text}");
        assert!(
            lines[1].contains("direct") && lines[1].contains("10.0.0.2:7445"),
            "{text}"
        );
        assert!(lines[1].contains("3m"), "{text}");
        assert_eq!(human_mesh(&[], now), "no peer connections reported\n");
    }
}
