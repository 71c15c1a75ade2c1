//! The roles a node can run. Each role owns its HTTP routes and actors and
//! reaches the buses only through the bridges.

pub mod llm_manager;
pub mod panel_manager;
pub mod traffic_gateway;
pub mod transaction_manager;
