//! stepbox.toml plus STEPBOX_* variables on arbitrary input: the text up to the first NUL is the
//! file, each later line `KEY=VALUE` a variable. Loading gives an error or a configuration that
//! passes its own checks, and `config check`'s masked output never shows a token hash or an
//! exporter header value.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let (file, env) = text.split_once('\0').unwrap_or((text, ""));
    let vars: Vec<(String, String)> = env
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (format!("STEPBOX_{k}"), v.to_string()))
        .collect();
    if let Ok(c) = stepbox::service::config::Config::parse(file, "fuzz.toml", vars) {
        c.check().expect("a loaded configuration passes its checks");
        // The masked output is TOML again, with every secret replaced.
        let shown: toml::Table = toml::from_str(&c.masked_toml()).expect("masked output is TOML");
        if let Some(tenants) = shown.get("tenants").and_then(|t| t.as_array()) {
            for t in tenants {
                for tok in t.get("tokens").and_then(|t| t.as_array()).into_iter().flatten() {
                    let tok = tok.as_str().unwrap_or_default();
                    assert!(tok.ends_with("hashed token(s)>"), "token shown: {tok}");
                }
            }
        }
        let headers = shown
            .get("telemetry")
            .and_then(|t| t.get("headers"))
            .and_then(|h| h.as_table());
        for v in headers.into_iter().flat_map(|h| h.values()) {
            assert_eq!(v.as_str(), Some("<masked>"), "header value shown");
        }
    }
});
