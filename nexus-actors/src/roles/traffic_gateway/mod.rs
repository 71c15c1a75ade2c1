//! The `traffic-gateway` role: the only way in to panels.
