//! The node's open-file limit. Every WebSocket session, proxied request
//! and bus connection is a descriptor, and the usual soft limit (1,024
//! under systemd) would refuse sessions long before memory or CPU run out.
//! At start a node raises its soft limit to the hard limit, as Go's runtime
//! and nginx's `worker_rlimit_nofile` do; the hard limit stays the
//! operator's to set (systemd `LimitNOFILE`, `ulimit -Hn`, a Pod's runtime).

/// The soft open-file limit before and after raising it to the hard limit.
pub fn raise_to_hard() -> std::io::Result<(u64, u64)> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit and setrlimit only read and write the struct given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let before = limit.rlim_cur;
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit { rlim_cur: limit.rlim_max, rlim_max: limit.rlim_max };
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok((before, limit.rlim_max))
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_soft_limit_is_raised_to_the_hard_one() {
        let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: as in the module.
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
        // Lowered only by half, so that a test run in the same process
        // (`cargo test` shares one) keeps plenty.
        let lowered = libc::rlimit { rlim_cur: limit.rlim_max / 2, rlim_max: limit.rlim_max };
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lowered) }, 0);
        assert_eq!(super::raise_to_hard().unwrap(), (limit.rlim_max / 2, limit.rlim_max));
        let mut now = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut now) };
        assert_eq!(now.rlim_cur, limit.rlim_max);
    }
}
