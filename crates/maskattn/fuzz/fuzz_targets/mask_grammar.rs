//! The mask grammar on arbitrary input: parsing never panics or overflows the stack, every
//! error is a syntax error, and whatever parses prints to text that parses to the same mask.
#![no_main]

use libfuzzer_sys::fuzz_target;
use maskattn::{AttnError, Mask};

fn data(name: &str) -> Option<Mask> {
    match name {
        "key-padding" => Some(Mask::key_padding(vec![3])),
        "documents" => Some(Mask::documents(vec![0i64, 0, 1], 1)),
        _ => None,
    }
}

fuzz_target!(|bytes: &[u8]| {
    let Ok(text) = std::str::from_utf8(bytes) else {
        return;
    };
    match Mask::parse_with(text, data) {
        Ok(m) => {
            let printed = m.to_string();
            let back = Mask::parse_with(&printed, data).expect("printed masks parse");
            assert!(back == m, "{text:?} printed as {printed:?} came back as {back}");
            // Compiling validates the depth and the sizes before anything recurses.
            let _ = maskattn::BlockMask::new(&m, maskattn::MaskShape::new(1, 1, 3, 3));
        }
        Err(e) => assert!(matches!(e, AttnError::MaskSyntax { .. }), "{e}"),
    }
});
