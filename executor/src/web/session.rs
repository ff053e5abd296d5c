//! Sign-in sessions, kept on the server: the browser holds only a random id in a `Secure`,
//! `HttpOnly`, `SameSite=Strict` cookie; the session holds the tenant its bearer token named and
//! a CSRF token that every state-changing request must echo (a form field or the
//! `x-csrf-token` header). Sessions end after [`crate::web::WebOptions::session_idle`] unused,
//! at sign-out, or when the server stops; at most [`MAX_SESSIONS`] live at once (the oldest
//! go first).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, HeaderValue, header};

use crate::service::tenancy::Tenant;

/// The session cookie's name.
pub const COOKIE: &str = "stepbox_session";

/// Sessions kept at once: each is a few hundred bytes, so this bounds memory to a few MB even
/// when someone signs in in a loop.
pub const MAX_SESSIONS: usize = 10_000;

/// One signed-in browser.
#[derive(Debug)]
pub struct Session {
    /// The tenant its token named.
    pub tenant: Arc<Tenant>,
    /// The token its forms must echo.
    pub csrf: String,
    last_seen: Mutex<Instant>,
}

/// Every live session, by id.
#[derive(Debug)]
pub struct Sessions {
    by_id: Mutex<HashMap<String, Arc<Session>>>,
    idle: Duration,
}

/// A fresh random token: 244 bits from the operating system's generator, as hex.
pub fn random_token() -> String {
    format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    )
}

/// Whether two strings are equal, in time that depends only on their lengths.
pub fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

impl Sessions {
    /// No sessions; each lasts `idle` without use.
    pub fn new(idle: Duration) -> Sessions {
        Sessions {
            by_id: Mutex::default(),
            idle,
        }
    }

    /// Starts a session for `tenant`: its id (for the cookie) and the session.
    pub fn create(&self, tenant: Arc<Tenant>) -> (String, Arc<Session>) {
        let id = random_token();
        let session = Arc::new(Session {
            tenant,
            csrf: random_token(),
            last_seen: Mutex::new(Instant::now()),
        });
        let mut map = self.by_id.lock().unwrap_or_else(|e| e.into_inner());
        let idle = self.idle;
        if map.len() >= MAX_SESSIONS {
            map.retain(|_, s| s.last_seen().elapsed() < idle);
        }
        while map.len() >= MAX_SESSIONS {
            let oldest = map
                .iter()
                .min_by_key(|(_, s)| s.last_seen())
                .map(|(k, _)| k.clone());
            match oldest {
                Some(k) => map.remove(&k),
                None => break,
            };
        }
        map.insert(id.clone(), session.clone());
        (id, session)
    }

    /// The live session the request's cookie names, touched.
    pub fn get(&self, headers: &HeaderMap) -> Option<Arc<Session>> {
        let id = cookie(headers, COOKIE)?;
        let mut map = self.by_id.lock().unwrap_or_else(|e| e.into_inner());
        let session = map.get(id)?.clone();
        if session.last_seen().elapsed() >= self.idle {
            map.remove(id);
            return None;
        }
        *session.last_seen.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        Some(session)
    }

    /// Ends the session the request's cookie names.
    pub fn remove(&self, headers: &HeaderMap) {
        if let Some(id) = cookie(headers, COOKIE) {
            self.by_id
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(id);
        }
    }

    /// The `Set-Cookie` value for session `id`.
    pub fn set_cookie(&self, id: &str) -> HeaderValue {
        HeaderValue::from_str(&format!(
            "{COOKIE}={id}; Path=/; Max-Age={}; Secure; HttpOnly; SameSite=Strict",
            self.idle.as_secs()
        ))
        .expect("hex ids make a valid header")
    }

    /// The `Set-Cookie` value that deletes the cookie.
    pub fn clear_cookie() -> HeaderValue {
        HeaderValue::from_static(
            "stepbox_session=; Path=/; Max-Age=0; Secure; HttpOnly; SameSite=Strict",
        )
    }
}

impl Session {
    fn last_seen(&self) -> Instant {
        *self.last_seen.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether `token` is this session's CSRF token.
    pub fn csrf_ok(&self, token: &str) -> bool {
        same(&self.csrf, token)
    }
}

/// The value of cookie `name` in the request's `Cookie` headers.
pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// Refuses a state-changing request another site's page sent: when the browser says where it
/// came from (`Origin`), that must be this server (`Host`). Browsers send `Origin` on every
/// cross-site POST, so this stops a page elsewhere from posting here (the CSRF token and the
/// `SameSite=Strict` cookie stop it too; this also covers the local user, who has no sign-in).
pub fn same_origin(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        return true;
    };
    let Some(host) = headers.get(header::HOST).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let origin_host = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"));
    origin_host == Some(host)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::tenancy::Tenants;

    fn local() -> Arc<Tenant> {
        Tenants::default()
            .authenticate(&tonic::metadata::MetadataMap::new())
            .unwrap()
    }

    fn with_cookie(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::COOKIE, HeaderValue::from_str(v).unwrap());
        h
    }

    #[test]
    fn sessions_are_found_by_cookie_and_expire() {
        let s = Sessions::new(Duration::from_millis(200));
        let (id, session) = s.create(local());
        assert_eq!(id.len(), 64);
        let found = s
            .get(&with_cookie(&format!("a=b; {COOKIE}={id}; c=d")))
            .unwrap();
        assert!(Arc::ptr_eq(&found, &session));
        assert!(s.get(&with_cookie(&format!("{COOKIE}=x{id}"))).is_none());
        assert!(s.get(&HeaderMap::new()).is_none());
        std::thread::sleep(Duration::from_millis(250));
        assert!(s.get(&with_cookie(&format!("{COOKIE}={id}"))).is_none());
        let cookie = s.set_cookie(&id);
        let cookie = cookie.to_str().unwrap();
        for attr in ["Secure", "HttpOnly", "SameSite=Strict", "Path=/"] {
            assert!(cookie.contains(attr), "{cookie}");
        }
    }

    #[test]
    fn csrf_tokens_and_origins() {
        let s = Sessions::new(Duration::from_secs(60));
        let (_, session) = s.create(local());
        assert!(session.csrf_ok(&session.csrf.clone()));
        assert!(!session.csrf_ok(""));
        assert!(!session.csrf_ok(&random_token()));
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("127.0.0.1:8080"));
        assert!(same_origin(&h));
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://127.0.0.1:8080"),
        );
        assert!(same_origin(&h));
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("https://evil.example"),
        );
        assert!(!same_origin(&h));
    }

    #[test]
    fn sessions_are_bounded() {
        let s = Sessions::new(Duration::from_secs(60));
        let (first, _) = s.create(local());
        for _ in 0..MAX_SESSIONS {
            s.create(local());
        }
        assert!(s.by_id.lock().unwrap().len() <= MAX_SESSIONS);
        assert!(s.get(&with_cookie(&format!("{COOKIE}={first}"))).is_none());
    }
}
