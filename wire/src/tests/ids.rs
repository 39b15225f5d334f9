//! `InvocationId`'s text form: 32 lowercase hex digits, parsed strictly.

use proptest::prelude::*;

use super::config;
use crate::invoke::{InvocationId, ParseInvocationIdError};

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn display_parse_round_trip(id in any::<InvocationId>()) {
        let text = id.to_string();
        prop_assert_eq!(text.len(), 32);
        prop_assert!(text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')), "{}", text);
        prop_assert_eq!(text.parse::<InvocationId>(), Ok(id));
        // Upper case is accepted on input; output is always lower case.
        prop_assert_eq!(text.to_uppercase().parse::<InvocationId>(), Ok(id));
        prop_assert_eq!(format!("{id:?}"), format!("InvocationId({text})"));
    }

    #[test]
    fn parse_never_panics(s in "\\PC{0,40}") {
        if let Ok(id) = s.parse::<InvocationId>() {
            prop_assert_eq!(id.to_string(), s.to_lowercase());
        }
    }
}

#[test]
fn display_is_byte_order() {
    let mut bytes = [0u8; 16];
    bytes[0] = 0x01;
    bytes[15] = 0xfe;
    assert_eq!(
        InvocationId(bytes).to_string(),
        "010000000000000000000000000000fe"
    );
}

#[test]
fn bad_inputs_are_refused() {
    let bad = [
        "".to_string(),
        "0".repeat(31),
        "0".repeat(33),
        "0".repeat(64),
        format!("0x{}", "0".repeat(30)),
        format!("g{}", "0".repeat(31)),
        format!("{} ", "0".repeat(31)),
        format!(" {}", "0".repeat(31)),
        format!("-{}", "0".repeat(31)),
        format!("+{}", "0".repeat(31)),
        "0123456789abcdef-0123456789abcde".to_string(),
        // 32 bytes, but 16 two-byte characters: length alone must not decide.
        "é".repeat(16),
        // Fullwidth digits are not hex digits.
        "０".repeat(8) + &"0".repeat(8),
    ];
    for s in bad {
        assert_eq!(
            s.parse::<InvocationId>(),
            Err(ParseInvocationIdError),
            "{s:?}"
        );
    }
}
