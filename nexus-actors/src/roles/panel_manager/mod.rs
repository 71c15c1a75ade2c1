//! The `panel-manager` role: one `PodLifecycle` actor per panel instance
//! over a [`driver::RuntimeDriver`].

pub mod driver;
pub mod local;
