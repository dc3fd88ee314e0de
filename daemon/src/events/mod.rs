//! What the probe sends: records taken out of the ring buffer as they arrive
//! ([`intake`]), decoded into typed events ([`decode`]), with the probe's boot-time clock
//! turned into wall-clock time ([`clock`]).

pub mod clock;
pub mod decode;
pub mod intake;

pub use decode::{Access, DecodeError, Event, Task, decode, userspace_dev};
