//! Lists decoded against a per-frame memory budget.
//!
//! bincode's limit counts the bytes a message claims on the wire (a string's length, a
//! number's width), not what its decoded form takes: a list of a million one-byte paths is a
//! few megabytes of frame and a hundred megabytes of `Vec` slots and shared path allocations.
//! Every list in the protocol is therefore decoded by [`vec`], which charges each list's slots
//! (`len × size_of::<T>()`, before reserving them) and each element's own allocations
//! ([`Weigh::heap`], as it is decoded) to a budget of [`MAX_FRAME`] bytes per frame, and fails
//! the decode when the budget runs out.

use crate::{Finding, Need, ProbeItem, ReleaseSummary, SigItem, MAX_FRAME};
use serde::de::{Deserialize, Deserializer, Error, SeqAccess, Visitor};
use std::cell::Cell;
use std::marker::PhantomData;

thread_local! {
    /// Bytes of list memory the frame being decoded on this thread may still allocate.
    static BUDGET: Cell<usize> = const { Cell::new(MAX_FRAME) };
}

/// Resets the budget for the next frame (called by `decode`).
pub(crate) fn reset() {
    BUDGET.with(|b| b.set(MAX_FRAME));
}

fn charge<E: Error>(n: usize) -> Result<(), E> {
    BUDGET.with(|b| match b.get().checked_sub(n) {
        Some(left) => {
            b.set(left);
            Ok(())
        }
        None => Err(E::custom(format!(
            "the message would take more than {MAX_FRAME} bytes of memory once decoded"
        ))),
    })
}

/// Heap memory a list element owns beyond its slot in the list.
pub trait Weigh {
    /// Bytes of heap memory the element owns.
    fn heap(&self) -> usize;
}

/// What one shared path allocation costs beyond its bytes.
const PATH_COST: usize = 32;

impl Weigh for u64 {
    fn heap(&self) -> usize {
        0
    }
}

impl Weigh for String {
    fn heap(&self) -> usize {
        self.capacity()
    }
}

impl Weigh for ProbeItem {
    fn heap(&self) -> usize {
        self.dir.capacity()
    }
}

impl Weigh for SigItem {
    fn heap(&self) -> usize {
        PATH_COST + self.basis.as_str().len()
    }
}

impl Weigh for Need {
    fn heap(&self) -> usize {
        self.basis
            .as_ref()
            .map_or(0, |(p, _)| PATH_COST + p.as_str().len())
    }
}

impl Weigh for flip_manifest::RelPath {
    fn heap(&self) -> usize {
        PATH_COST + self.as_str().len()
    }
}

impl Weigh for crate::ProbeState {
    fn heap(&self) -> usize {
        0
    }
}

impl Weigh for ReleaseSummary {
    fn heap(&self) -> usize {
        self.label.as_ref().map_or(0, String::capacity)
    }
}

impl Weigh for Finding {
    fn heap(&self) -> usize {
        self.check.capacity()
            + self.message.capacity()
            + self.fix.as_ref().map_or(0, String::capacity)
    }
}

/// `deserialize_with` for every list of the protocol: see the [module docs](self).
pub(crate) fn vec<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Weigh,
{
    struct V<T>(PhantomData<T>);
    impl<'de, T: Deserialize<'de> + Weigh> Visitor<'de> for V<T> {
        type Value = Vec<T>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a list")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
            // bincode always knows the length; anything else grows the list step by step,
            // charging each step.
            let hint = seq.size_hint().unwrap_or(0);
            charge(hint.saturating_mul(std::mem::size_of::<T>()))?;
            let mut out = Vec::with_capacity(hint);
            while let Some(x) = seq.next_element::<T>()? {
                charge(x.heap())?;
                if out.len() == out.capacity() {
                    charge(out.capacity().max(4) * std::mem::size_of::<T>())?;
                }
                out.push(x);
            }
            Ok(out)
        }
    }
    d.deserialize_seq(V(PhantomData))
}
