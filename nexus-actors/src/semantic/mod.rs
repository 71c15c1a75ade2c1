//! The semantic layer's shared parts: the records of `semantic.commands`
//! and `semantic.events`, producing commands with their hints, the
//! conversation they fold into, and reading a context's journal back. The
//! LLM manager writes the journal; the transaction manager's API and the
//! CLI read it. Calling models is the LLM manager's job, not this module's.

pub mod chat;
pub mod commands;
pub mod directory;
pub mod fold;
pub mod journal;
pub mod records;
