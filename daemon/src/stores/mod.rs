//! Trust stores: every trust file as each root sees it, its versions over time
//! ([`catalog`]), what each version holds ([`formats`]), change notification
//! ([`watch`]), and what a new process on the host would trust ([`reference`]).

pub mod catalog;
pub mod digest;
pub mod formats;
pub mod identity;
pub mod reference;
pub mod watch;
