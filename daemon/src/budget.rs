//! Byte budgets shared across threads: what holds bytes is charged for them while it
//! lives, wherever it is held, and gives them back when dropped. The catalog bounds the
//! parsed content it keeps and the bytes being read at once with one each.

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

#[derive(Clone, Debug, Default)]
pub struct Budget {
    used: Arc<AtomicU64>,
    max: Arc<AtomicU64>,
}

impl Budget {
    pub fn new(max: u64) -> Self {
        let budget = Self::default();
        budget.set_max(max);
        budget
    }

    pub fn set_max(&self, max: u64) {
        self.max.store(max, Ordering::Relaxed);
    }

    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// Whether `bytes` more fit.
    pub fn fits(&self, bytes: u64) -> bool {
        self.used().saturating_add(bytes) <= self.max.load(Ordering::Relaxed)
    }

    /// Charges `bytes` whether they fit or not (what was already built is accounted
    /// for; the caller decided with [`Budget::fits`] beforehand).
    pub fn charge(&self, bytes: u64) -> Charge {
        self.used.fetch_add(bytes, Ordering::Relaxed);
        Charge {
            bytes,
            used: Some(Arc::clone(&self.used)),
        }
    }

    /// Grows `charge` by `bytes` if they fit; false, and nothing taken, if not.
    pub fn try_grow(&self, charge: &mut Charge, bytes: u64) -> bool {
        let max = self.max.load(Ordering::Relaxed);
        let took = self
            .used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                used.checked_add(bytes).filter(|&n| n <= max)
            })
            .is_ok();
        if took {
            if charge.used.is_none() {
                charge.used = Some(Arc::clone(&self.used));
            }
            charge.bytes += bytes;
        }
        took
    }
}

/// A holder's share of a [`Budget`].
#[derive(Debug, Default)]
pub struct Charge {
    bytes: u64,
    used: Option<Arc<AtomicU64>>,
}

impl Charge {
    /// Not counted against any budget (tests, and what holds nothing parsed).
    pub fn none() -> Self {
        Self::default()
    }
}

impl Clone for Charge {
    fn clone(&self) -> Self {
        if let Some(used) = &self.used {
            used.fetch_add(self.bytes, Ordering::Relaxed);
        }
        Self {
            bytes: self.bytes,
            used: self.used.clone(),
        }
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        if let Some(used) = &self.used {
            used.fetch_sub(self.bytes, Ordering::Relaxed);
        }
    }
}

/// Two holders are alike whatever they are charged.
impl PartialEq for Charge {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_charge_holds_its_bytes_until_every_clone_is_dropped() {
        let budget = Budget::new(100);
        let a = budget.charge(60);
        let b = a.clone();
        assert_eq!(budget.used(), 120);
        assert!(!budget.fits(1));
        drop(a);
        drop(b);
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn growing_past_the_budget_takes_nothing() {
        let budget = Budget::new(100);
        let mut c = Charge::none();
        assert!(budget.try_grow(&mut c, 80));
        assert!(!budget.try_grow(&mut c, 30));
        assert_eq!(budget.used(), 80);
        drop(c);
        assert_eq!(budget.used(), 0);
    }
}
