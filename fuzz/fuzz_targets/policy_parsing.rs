//! Policy files on arbitrary text: an error or a policy whose defaults are within its maximums.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(p) = stepbox::job::policy::Policy::parse("fuzz", text, "fuzz.toml") {
        let l = &p.file.limits;
        assert!(l.default.first_above(&l.max).is_none());
        let _ = p.limits_for(&Default::default());
    }
});
