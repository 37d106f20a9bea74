use crate::types::Boolean;

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

/// How many flags [AMQPFlags] holds without allocating: more than any AMQP 0-9-1 method has.
const INLINE: usize = 8;

/// A struct representing AMQP boolean flags for RPC
///
/// Held inline: a method's flags are read and written for every frame that carries them
/// (`basic.publish`, `basic.deliver`, `basic.ack`), and a vector of owned names cost two or
/// more allocations each time. Names read from the wire and written by the generated code are
/// constants, kept as plain references (nothing to drop); a name given as a `String` goes, with
/// every flag after it, to the vector, so that the flags keep their order.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(from = "Listed", into = "Listed")]
pub struct AMQPFlags {
    names: [&'static str; INLINE],
    /// The inline flags' values, one bit each, the first flag lowest.
    bits: u8,
    /// How many flags are inline.
    inline: u8,
    /// The flags after the inline ones.
    more: Vec<(Cow<'static, str>, Boolean)>,
}

/// The serialized form: the flags in order, as earlier versions wrote them.
#[derive(Deserialize, Serialize)]
struct Listed {
    flags: Vec<(String, Boolean)>,
}

impl From<Listed> for AMQPFlags {
    fn from(listed: Listed) -> Self {
        let mut flags = AMQPFlags::default();
        for (name, flag) in listed.flags {
            flags.push(Cow::Owned(name), flag);
        }
        flags
    }
}

impl From<AMQPFlags> for Listed {
    fn from(flags: AMQPFlags) -> Self {
        Listed {
            flags: flags.iter().map(|(n, b)| (n.to_string(), b)).collect(),
        }
    }
}

impl PartialEq for AMQPFlags {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.iter().eq(other.iter())
    }
}

impl AMQPFlags {
    fn push(&mut self, name: Cow<'static, str>, flag: Boolean) {
        match name {
            Cow::Borrowed(name) if self.more.is_empty() && usize::from(self.inline) < INLINE => {
                self.names[usize::from(self.inline)] = name;
                self.bits |= u8::from(flag) << self.inline;
                self.inline += 1;
            }
            name => self.more.push((name, flag)),
        }
    }

    fn len(&self) -> usize {
        usize::from(self.inline) + self.more.len()
    }

    /// Every flag, in order.
    fn iter(&self) -> impl Iterator<Item = (&str, Boolean)> {
        self.names[..usize::from(self.inline)]
            .iter()
            .enumerate()
            .map(|(i, name)| (*name, (self.bits >> i) & 1 == 1))
            .chain(self.more.iter().map(|(name, flag)| (&**name, *flag)))
    }

    /// The flags as AMQP writes them, eight to a byte, the first flag lowest.
    pub(crate) fn bytes(&self) -> impl Iterator<Item = u8> + '_ {
        // Inline flags alone (every method's): their bits are the byte.
        let alone = (self.more.is_empty() && self.inline > 0).then_some(self.bits);
        let values: Vec<Boolean> = if self.more.is_empty() {
            Vec::new()
        } else {
            self.iter().map(|(_, b)| b).collect()
        };
        let packed: Vec<u8> = values
            .chunks(8)
            .map(|chunk| {
                chunk
                    .iter()
                    .enumerate()
                    .map(|(idx, b)| if *b { 1 << idx } else { 0 })
                    .sum()
            })
            .collect();
        alone.into_iter().chain(packed)
    }

    /// Add a boolean flag with a name
    pub fn add_flag(&mut self, name: String, flag: Boolean) {
        self.push(Cow::Owned(name), flag);
    }

    /// Add a boolean flag whose name is a constant (as the generated code's are), without
    /// allocating.
    pub fn add_static_flag(&mut self, name: &'static str, flag: Boolean) {
        self.push(Cow::Borrowed(name), flag);
    }

    /// Get the value of a boolean flag by name, if present
    #[must_use]
    pub fn get_flag(&self, name: &str) -> Option<Boolean> {
        self.iter().find(|(n, _)| *n == name).map(|(_, v)| v)
    }

    /// Get the AMQPFlags serialized for AMQP RPC
    #[must_use]
    pub fn get_bytes(&self) -> Vec<u8> {
        self.bytes().collect()
    }

    /// Initialize AMQPFlags from AMQP RPC serialization
    pub fn from_bytes<I: nom::Input<Item = u8>>(names: &[&'static str], bytes: I) -> AMQPFlags {
        let mut flags = AMQPFlags::default();
        let values = bytes
            .iter_elements()
            .flat_map(|b| (0..8u8).map(move |s| ((b >> s) & 1) == 1));
        for (name, flag) in names.iter().zip(values) {
            flags.push(Cow::Borrowed(name), flag);
        }
        flags
    }
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn test_empty_flags() {
        let empty: &[u8] = &[];
        assert_eq!(AMQPFlags::default().get_bytes().as_slice(), empty);
    }

    #[test]
    fn test_flags() {
        let mut flags = AMQPFlags::default();
        flags.add_flag("a".to_string(), true);
        flags.add_flag("b".to_string(), false);
        flags.add_flag("c".to_string(), false);
        flags.add_flag("d".to_string(), true);
        flags.add_flag("e".to_string(), true);
        assert_eq!(flags.get_bytes().as_slice(), &[0b00011001])
    }

    #[test]
    fn test_many_flags() {
        let mut flags = AMQPFlags::default();
        flags.add_flag("a".to_string(), true);
        flags.add_flag("b".to_string(), false);
        flags.add_flag("c".to_string(), false);
        flags.add_flag("d".to_string(), true);
        flags.add_flag("e".to_string(), true);
        flags.add_flag("f".to_string(), true);
        flags.add_flag("g".to_string(), false);
        flags.add_flag("h".to_string(), false);
        flags.add_flag("i".to_string(), true);
        flags.add_flag("j".to_string(), true);
        assert_eq!(flags.get_bytes().as_slice(), &[0b00111001, 0b00000011])
    }

    #[test]
    fn test_flags_read_back_as_written() {
        let names = ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j"];
        let mut written = AMQPFlags::default();
        for (i, name) in names.iter().enumerate() {
            written.add_flag(name.to_string(), i % 3 == 0);
        }
        let read = AMQPFlags::from_bytes(&names, written.get_bytes().as_slice());
        assert_eq!(read, written);
        assert_eq!(read.get_flag("i"), Some(false));
        assert_eq!(read.get_flag("j"), Some(true));
        assert_eq!(
            AMQPFlags::from_bytes(&names[..2], &[0b10][..]).get_flag("b"),
            Some(true)
        );
        assert_ne!(AMQPFlags::from_bytes(&names[..2], &[0b10][..]), read);
    }

    #[test]
    fn test_lookup_flags() {
        let mut flags = AMQPFlags::default();
        flags.add_flag("a".to_string(), true);
        flags.add_flag("b".to_string(), false);
        flags.add_flag("c".to_string(), false);
        flags.add_flag("d".to_string(), true);
        flags.add_flag("e".to_string(), true);
        flags.add_flag("f".to_string(), true);
        flags.add_flag("g".to_string(), false);
        flags.add_flag("h".to_string(), false);
        flags.add_flag("i".to_string(), true);
        flags.add_flag("j".to_string(), true);
        assert_eq!(flags.get_flag("a"), Some(true));
        assert_eq!(flags.get_flag("d"), Some(true));
        assert_eq!(flags.get_flag("e"), Some(true));
        assert_eq!(flags.get_flag("b"), Some(false));
        assert_eq!(flags.get_flag("j"), Some(true));
        assert_eq!(flags.get_flag("h"), Some(false));
        assert_eq!(flags.get_flag("z"), None);
    }

    #[test]
    fn test_constant_and_owned_names_keep_their_order() {
        let mut flags = AMQPFlags::default();
        flags.add_static_flag("a", true);
        flags.add_flag("b".to_string(), false);
        flags.add_static_flag("c", true);
        assert_eq!(flags.get_bytes().as_slice(), &[0b101]);
        let names: Vec<(&str, bool)> = flags.iter().collect();
        assert_eq!(names, [("a", true), ("b", false), ("c", true)]);
        assert_eq!(flags, AMQPFlags::from_bytes(&["a", "b", "c"], &[0b101][..]));
    }

    #[test]
    fn test_static_flags_are_written_as_owned_ones() {
        let mut owned = AMQPFlags::default();
        let mut constant = AMQPFlags::default();
        for (i, name) in ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j"]
            .into_iter()
            .enumerate()
        {
            owned.add_flag(name.to_string(), i % 4 == 1);
            constant.add_static_flag(name, i % 4 == 1);
        }
        assert_eq!(constant.get_bytes(), owned.get_bytes());
        assert_eq!(constant.get_bytes().as_slice(), &[0b00100010, 0b00000010]);
        assert_eq!(constant, owned);
    }
}
