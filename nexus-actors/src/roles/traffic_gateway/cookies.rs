//! Cookies at the gateway: the gateway's own (`nexus_panel`, which opens
//! one panel) and the panels'.
//!
//! Every panel is served from the gateway's one origin, so cookies are
//! shared between panels unless the gateway keeps them apart:
//! * the `nexus_panel` cookie is read here ([`panel_tokens`]) and taken out
//!   of every request before it reaches a panel ([`strip_panel_cookie`]):
//!   a panel never sees the credential that opens it;
//! * a panel's `Set-Cookie` is scoped to its own path (`Path=/` becomes
//!   `Path=/p/<id>/`, `Domain` is dropped) and may never set
//!   `nexus_panel` ([`scope_set_cookies`]), so one panel can neither read
//!   nor plant cookies on another panel's path. (`__Host-` cookies, which
//!   demand `Path=/`, cannot work behind the gateway.)
//!
//! Who may open what is decided in [`super::access`], not here.

use http::header::{self, HeaderValue};
use http::HeaderMap;

use crate::platform::auth::{panel_path, PANEL_COOKIE};

/// At most this many `nexus_panel` values of one request are checked
/// (a browser sends one per matching path; more is someone trying).
pub(crate) const MAX_PANEL_TOKENS: usize = 4;

/// The `nexus_panel` values among the request's `Cookie` headers, at most
/// [`MAX_PANEL_TOKENS`].
pub(crate) fn panel_tokens(headers: &HeaderMap) -> Vec<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .filter(|(name, _)| *name == PANEL_COOKIE)
        .map(|(_, value)| value.trim().trim_matches('"'))
        .filter(|value| !value.is_empty())
        .take(MAX_PANEL_TOKENS)
        .collect()
}

/// Takes `nexus_panel` out of every `Cookie` header and keeps the other
/// cookies as they were; a header left empty goes.
pub(crate) fn strip_panel_cookie(headers: &mut HeaderMap) {
    if !headers.contains_key(header::COOKIE) {
        return;
    }
    let kept: Vec<HeaderValue> = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| {
            let pairs: Vec<&[u8]> = value
                .as_bytes()
                .split(|b| *b == b';')
                .map(|pair| pair.trim_ascii())
                .filter(|pair| !pair.is_empty() && cookie_name(pair) != PANEL_COOKIE.as_bytes())
                .collect();
            HeaderValue::from_bytes(&pairs.join(&b"; "[..])).ok().filter(|v| !v.is_empty())
        })
        .collect();
    headers.remove(header::COOKIE);
    for value in kept {
        headers.append(header::COOKIE, value);
    }
}

fn cookie_name(pair: &[u8]) -> &[u8] {
    let name = pair.split(|b| *b == b'=').next().unwrap_or(pair);
    name.trim_ascii()
}

/// Scopes every `Set-Cookie` of `panel`'s answer to the panel's own path
/// and drops any that would set `nexus_panel` (or that cannot be read).
pub(crate) fn scope_set_cookies(headers: &mut HeaderMap, panel: &str) {
    if !headers.contains_key(header::SET_COOKIE) {
        return;
    }
    let prefix = panel_path(panel);
    let scoped: Vec<HeaderValue> = headers
        .get_all(header::SET_COOKIE)
        .iter()
        .filter_map(|value| {
            let text = value.to_str().ok()?;
            let scoped = scope(text, &prefix);
            if scoped.is_none() {
                tracing::warn!(panel, "a panel's Set-Cookie for the gateway's own cookie was dropped");
            }
            HeaderValue::from_str(&scoped?).ok()
        })
        .collect();
    headers.remove(header::SET_COOKIE);
    for value in scoped {
        headers.append(header::SET_COOKIE, value);
    }
}

/// One `Set-Cookie` value scoped under `prefix` (`/p/<id>/`); `None` for
/// the gateway's own cookie.
fn scope(set_cookie: &str, prefix: &str) -> Option<String> {
    let mut parts = set_cookie.split(';');
    let pair = parts.next().unwrap_or("").trim();
    if cookie_name(pair.as_bytes()) == PANEL_COOKIE.as_bytes() {
        return None;
    }
    let mut out = vec![pair.to_owned()];
    for attribute in parts {
        let attribute = attribute.trim();
        let (name, value) = attribute.split_once('=').map_or((attribute, ""), |(n, v)| (n.trim(), v.trim()));
        if name.eq_ignore_ascii_case("domain") {
            continue;
        }
        if name.eq_ignore_ascii_case("path") {
            // The panel sees itself at `/`: its `/x` is the gateway's `/p/<id>/x`.
            let own = value.starts_with(prefix) || value == prefix.trim_end_matches('/');
            let path = match value.strip_prefix('/') {
                Some(_) if own => value.to_owned(),
                Some(rest) => format!("{prefix}{rest}"),
                // Not a path at all: the browser would fall back to the
                // request's directory, which is under the prefix anyway.
                None => prefix.to_owned(),
            };
            out.push(format!("Path={path}"));
            continue;
        }
        if !attribute.is_empty() {
            out.push(attribute.to_owned());
        }
    }
    Some(out.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: &str = "0190a5a4-7a3c-7cc2-8a55-6f0b7f2b1c11";

    #[test]
    fn the_panel_cookie_is_found_and_taken_out_and_the_rest_stays() {
        let mut h = HeaderMap::new();
        h.append(header::COOKIE, HeaderValue::from_static("a=1; nexus_panel=tok; b=2"));
        h.append(header::COOKIE, HeaderValue::from_static("nexus_panel=\"other\""));
        h.append(header::COOKIE, HeaderValue::from_static("c=3"));
        assert_eq!(panel_tokens(&h), ["tok", "other"]);
        strip_panel_cookie(&mut h);
        let left: Vec<_> = h.get_all(header::COOKIE).iter().map(|v| v.to_str().unwrap()).collect();
        assert_eq!(left, ["a=1; b=2", "c=3"]);
    }

    #[test]
    fn set_cookies_are_scoped_to_the_panel_and_never_set_the_gateways_cookie() {
        let prefix = panel_path(P);
        assert_eq!(scope("s=1; Path=/; HttpOnly", &prefix).unwrap(), format!("s=1; Path=/p/{P}/; HttpOnly"));
        assert_eq!(scope("s=1; path=/app", &prefix).unwrap(), format!("s=1; Path=/p/{P}/app"));
        assert_eq!(scope(&format!("s=1; Path=/p/{P}/x"), &prefix).unwrap(), format!("s=1; Path=/p/{P}/x"));
        assert_eq!(scope("s=1; Path=/p/other/", &prefix).unwrap(), format!("s=1; Path=/p/{P}/p/other/"));
        assert_eq!(scope("s=1; Domain=example.com; Secure", &prefix).unwrap(), "s=1; Secure");
        assert_eq!(scope("s=1", &prefix).unwrap(), "s=1");
        assert!(scope("nexus_panel=forged; Path=/p/x/", &prefix).is_none());
        assert!(scope(" nexus_panel =forged", &prefix).is_none());

        let mut h = HeaderMap::new();
        h.append(header::SET_COOKIE, HeaderValue::from_static("a=1; Path=/"));
        h.append(header::SET_COOKIE, HeaderValue::from_static("nexus_panel=x; Path=/"));
        scope_set_cookies(&mut h, P);
        let left: Vec<_> = h.get_all(header::SET_COOKIE).iter().map(|v| v.to_str().unwrap().to_owned()).collect();
        assert_eq!(left, [format!("a=1; Path=/p/{P}/")]);
    }
}
