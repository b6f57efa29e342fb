//! The command line is space-separated `key=value` words (docs/GUESTS.md: Keel passes the
//! manifest's `cmdline` at RDI; when it restarts a guest it appends ` restart=<k>`).

/// The value of the first `key=value` word, if any.
pub fn word<'a>(cmdline: &'a [u8], key: &[u8]) -> Option<&'a [u8]> {
    cmdline
        .split(|&b| b == b' ')
        .find_map(|w| w.strip_prefix(key).and_then(|rest| rest.strip_prefix(b"=")))
}

/// A number written in decimal or with a `0x` prefix in hexadecimal; `None` if it is not one.
pub fn parse_number(text: &[u8]) -> Option<u64> {
    let (digits, radix) = match text.strip_prefix(b"0x") {
        Some(hex) => (hex, 16),
        None => (text, 10),
    };
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |acc, &c| {
        let d = (c as char).to_digit(radix)?;
        acc.checked_mul(u64::from(radix))?.checked_add(u64::from(d))
    })
}

/// The number after `key=`, or `default` if the word is missing or not a number.
pub fn number(cmdline: &[u8], key: &[u8], default: u64) -> u64 {
    word(cmdline, key).and_then(parse_number).unwrap_or(default)
}
