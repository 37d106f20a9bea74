mod structs;

pub use self::{
    generation::gen_frame,
    parsing::{parse_frame, parse_frame_slice},
    structs::*,
};

pub use crate::types::{
    generation::{BackToTheBuffer, GenError, GenResult, SerializeFn},
    parsing::{ParserError, ParserResult},
};
pub use cookie_factory::WriteContext;

/// Serialization utils
pub mod generation;
/// Parsing utils
pub mod parsing;
