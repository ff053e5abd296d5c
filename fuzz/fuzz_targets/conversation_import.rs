//! The conversation importer on arbitrary bytes (HTML, JSON, anything): an error naming what was
//! missing, or an extraction; never a panic or a hang.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = stepbox::authoring::conversation::extract(data, None);
    let _ = stepbox::authoring::conversation::extract(data, Some("x"));
});
