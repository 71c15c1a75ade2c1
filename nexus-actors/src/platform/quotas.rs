//! What one user may hold at once. Operators set these per node (flags of
//! `nexus dev` and `nexus node`); the roles that create the counted things
//! enforce them and answer `403 quota_exceeded` past them.

/// Per-user limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quotas {
    /// Panel records.
    pub panels: usize,
    /// Documents.
    pub documents: usize,
    /// Panel instances running at once (Studio instances and App replicas).
    pub instances: usize,
    /// LLM contexts (forks included).
    pub contexts: usize,
}

impl Default for Quotas {
    fn default() -> Self {
        Quotas { panels: 50, documents: 1000, instances: 8, contexts: 1000 }
    }
}
