//! What the probe sends: records taken out of the ring buffer as they arrive
//! ([`intake`]), decoded into typed events ([`decode`]), with the probe's boot-time clock
//! turned into wall-clock time ([`clock`]); each copied into the crash journal before the
//! ring buffer lets go of it ([`journal`]).

pub mod clock;
pub mod decode;
pub mod intake;
pub mod journal;

pub use decode::{Access, DecodeError, Event, Reread, Task, decode, userspace_dev};
