//! The stylesheet and the script, compiled into the binary and served with long caching under
//! a name that carries their digest (a new build never meets a stale copy).

use std::sync::LazyLock;

/// The stylesheet.
pub const STYLE_CSS: &str = include_str!("assets/style.css");

/// The page script (drag and drop, live runs).
pub const APP_JS: &str = include_str!("assets/app.js");

/// The first 12 hex digits of the assets' digest, part of their URLs.
pub static VERSION: LazyLock<String> = LazyLock::new(|| {
    crate::job::digest::sha256_hex(format!("{STYLE_CSS}{APP_JS}").as_bytes())[..12].to_string()
});

/// The stylesheet's URL.
pub fn style_url() -> String {
    format!("/assets/{}/style.css", *VERSION)
}

/// The script's URL.
pub fn script_url() -> String {
    format!("/assets/{}/app.js", *VERSION)
}
