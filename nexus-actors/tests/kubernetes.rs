//! The `kubernetes` runtime driver against a mock API server (no real
//! Kubernetes API server can run on these machines): the exact requests it
//! makes, the watch driving every state, API failures, and the templates'
//! bad input.

#[path = "kubernetes/common.rs"]
mod common;
#[path = "kubernetes/driver.rs"]
mod driver;
#[path = "kubernetes/failures.rs"]
mod failures;
#[path = "kubernetes/templates.rs"]
mod templates;
