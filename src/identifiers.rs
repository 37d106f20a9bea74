//! Person identifier checks used by the schemas' custom formats: the Italian codice fiscale
//! (including its check character) and the Swiss AHV number (including its EAN-13 check digit);
//! and a message's identifiers and their schemes and values, as the pipeline reads them.

use crate::envelope::Node;

/// The message's person identifiers (`subject.identifiers`); none when it has no such list.
pub fn of<'a, 'b>(envelope: &'a Node<'b>) -> &'a [Node<'b>] {
    envelope
        .get("subject")
        .and_then(|subject| subject.get("identifiers"))
        .and_then(Node::as_array)
        .unwrap_or_default()
}

/// [`of`], for changing them; `None` when the message has no such list.
pub fn of_mut<'a, 'b>(envelope: &'a mut Node<'b>) -> Option<&'a mut Vec<Node<'b>>> {
    envelope
        .get_mut("subject")?
        .get_mut("identifiers")?
        .as_array_mut()
}

/// The scheme and value of an identifier (`{"scheme": …, "value": …}`), both strings, found by
/// going through its fields (the two the schema allows) rather than by hashing each name.
pub fn scheme_and_value<'a>(id: &'a Node) -> Option<(&'a str, &'a str)> {
    let (mut scheme, mut value) = (None, None);
    for (name, field) in id.as_object()?.iter() {
        match name {
            "scheme" => scheme = field.as_str(),
            "value" => value = field.as_str(),
            _ => {}
        }
    }
    Some((scheme?, value?))
}

/// Format name of the codice fiscale check in the schemas (`"format": "it-cf"`).
pub const IT_CF_FORMAT: &str = "it-cf";
/// Format name of the AHV number check in the schemas (`"format": "ch-ahvn13"`).
pub const CH_AHVN13_FORMAT: &str = "ch-ahvn13";

/// Values of the odd (1st, 3rd, …) positions in the codice fiscale check computation, indexed by
/// the character's rank (digits 0-9 rank like letters A-J).
const CF_ODD: [u32; 26] = [
    1, 0, 5, 7, 9, 13, 15, 17, 19, 21, 2, 4, 18, 20, 11, 3, 6, 8, 12, 14, 16, 10, 22, 25, 24, 23,
];

/// Whether `value` is a well-formed codice fiscale whose 16th character is the right check
/// character. Upper case only, as issued; omocodia substitutions (letters in digit positions) are
/// accepted because the Agenzia delle Entrate issues them.
pub fn is_valid_codice_fiscale(value: &str) -> bool {
    let bytes = value.as_bytes();
    if bytes.len() != 16 {
        return false;
    }
    // Positions (0-based) that hold digits, or their omocodia letter substitutes.
    const NUMERIC: [usize; 7] = [6, 7, 9, 10, 12, 13, 14];
    const OMOCODIA: &[u8] = b"LMNPQRSTUV";
    for (i, &b) in bytes.iter().enumerate() {
        let ok = if NUMERIC.contains(&i) {
            b.is_ascii_digit() || OMOCODIA.contains(&b)
        } else {
            b.is_ascii_uppercase()
        };
        if !ok {
            return false;
        }
    }
    let rank = |b: u8| -> u32 {
        if b.is_ascii_digit() {
            u32::from(b - b'0')
        } else {
            u32::from(b - b'A')
        }
    };
    let sum: u32 = bytes[..15]
        .iter()
        .enumerate()
        .map(|(i, &b)| {
            if i % 2 == 0 {
                CF_ODD[rank(b) as usize]
            } else {
                rank(b)
            }
        })
        .sum();
    bytes[15] == b'A' + (sum % 26) as u8
}

/// Whether `value` is an AHV number written `756.XXXX.XXXX.XC` whose last digit is the EAN-13
/// check digit of the other twelve.
pub fn is_valid_ahv_number(value: &str) -> bool {
    let bytes = value.as_bytes();
    if bytes.len() != 16 || !value.starts_with("756.") || bytes[8] != b'.' || bytes[13] != b'.' {
        return false;
    }
    let digits: Vec<u32> = bytes
        .iter()
        .filter(|b| **b != b'.')
        .map(|b| u32::from(b.wrapping_sub(b'0')))
        .collect();
    if digits.len() != 13 || digits.iter().any(|d| *d > 9) {
        return false;
    }
    let sum: u32 = digits[..12]
        .iter()
        .enumerate()
        .map(|(i, d)| if i % 2 == 0 { *d } else { d * 3 })
        .sum();
    (10 - sum % 10) % 10 == digits[12]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codice_fiscale_with_right_check_character_is_valid() {
        assert!(is_valid_codice_fiscale("RSSMRA85T10A562S"));
        assert!(is_valid_codice_fiscale("BNCGVN70A41F257X"));
    }

    #[test]
    fn codice_fiscale_with_wrong_check_character_is_invalid() {
        assert!(!is_valid_codice_fiscale("RSSMRA85T10A562T"));
        assert!(!is_valid_codice_fiscale("BNCGVN70A41F257Q"));
    }

    #[test]
    fn codice_fiscale_shape_is_enforced() {
        assert!(!is_valid_codice_fiscale("rssmra85t10a562s"), "lower case");
        assert!(!is_valid_codice_fiscale("RSSMRA85T10A562"), "15 characters");
        assert!(
            !is_valid_codice_fiscale("RSSMRA85T10A5620"),
            "digit as check character"
        );
        assert!(
            !is_valid_codice_fiscale("1SSMRA85T10A562S"),
            "digit in a letter position"
        );
        assert!(!is_valid_codice_fiscale("RSSMRÀ85T10A562S"), "non-ASCII");
    }

    #[test]
    fn codice_fiscale_omocodia_is_accepted_with_its_own_check_character() {
        // The last digit of the municipality code replaced by its omocodia letter (2 -> N).
        assert!(is_valid_codice_fiscale("RSSMRA85T10A56NH"));
        assert!(!is_valid_codice_fiscale("RSSMRA85T10A56NS"));
    }

    #[test]
    fn ahv_number_with_right_check_digit_is_valid() {
        assert!(is_valid_ahv_number("756.1234.5678.97"));
        assert!(is_valid_ahv_number("756.9217.0769.85"));
    }

    #[test]
    fn ahv_number_with_wrong_check_digit_or_shape_is_invalid() {
        assert!(!is_valid_ahv_number("756.1234.5678.98"));
        assert!(!is_valid_ahv_number("7561234567897"), "without dots");
        assert!(
            !is_valid_ahv_number("757.1234.5678.97"),
            "not the Swiss prefix"
        );
        assert!(!is_valid_ahv_number("756.1234.5678.9x"));
    }
}
