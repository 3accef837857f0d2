//! A future placed in a heap allocation that is reused for the next future of the same
//! layout, instead of a `Box` allocated and freed per statement.
//!
//! Why by hand: a session runs each unit's future (several KiB) boxed, so that idle clients do
//! not carry that much task state (memory per idle client). glibc serves allocations that large
//! from its bins, not its per-thread cache, and a malloc/free pair of one cost ~450 instructions
//! per statement in the callgrind profile. `tokio_util::sync::ReusableBoxFuture` reuses one box
//! per owner, which would keep a unit-sized allocation in every idle session; here the memory
//! goes back to a small per-thread free list when the unit ends, so idle sessions hold none and
//! busy ones take a warm allocation. The unit future borrows its session, so a pool of typed,
//! `'static` boxes cannot hold it; what is recycled is the raw memory, by layout.

use std::alloc::{alloc, dealloc, handle_alloc_error, Layout};
use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::ptr::NonNull;
use std::task::{Context, Poll};

/// Allocations kept per thread: about as many units as run at once on a busy thread; more
/// are freed. (At ~5 KiB each, at most ~160 KiB per worker thread.)
const KEEP: usize = 32;

/// A thread's free allocations; returned to the allocator when the thread ends.
struct FreeList(Vec<(Layout, NonNull<u8>)>);

impl Drop for FreeList {
    fn drop(&mut self) {
        for (layout, ptr) in self.0.drain(..) {
            // SAFETY: every entry came from `alloc(layout)` and holds no value.
            unsafe { dealloc(ptr.as_ptr(), layout) }
        }
    }
}

thread_local! {
    static FREE: RefCell<FreeList> = const { RefCell::new(FreeList(Vec::new())) };
}

fn take(layout: Layout) -> NonNull<u8> {
    let reused = FREE
        .try_with(|f| {
            let f = &mut f.borrow_mut().0;
            let i = f.iter().rposition(|(l, _)| *l == layout)?;
            Some(f.swap_remove(i).1)
        })
        .ok()
        .flatten();
    reused.unwrap_or_else(|| {
        // SAFETY: `layout` has a non-zero size (checked by the caller).
        NonNull::new(unsafe { alloc(layout) }).unwrap_or_else(|| handle_alloc_error(layout))
    })
}

fn give(layout: Layout, ptr: NonNull<u8>) {
    let kept = FREE
        .try_with(|f| {
            let f = &mut f.borrow_mut().0;
            if f.len() < KEEP {
                f.push((layout, ptr));
                true
            } else {
                false
            }
        })
        .unwrap_or(false);
    if !kept {
        // SAFETY: `ptr` came from `alloc(layout)` (directly or through the free list).
        unsafe { dealloc(ptr.as_ptr(), layout) }
    }
}

/// A pinned future in a recycled allocation (see the module comment). Like `Pin<Box<F>>`, it
/// never moves the future; dropping it drops the future and returns the memory.
pub struct Recycled<F> {
    ptr: NonNull<F>,
    /// It owns an `F` (for the drop checker, as `Box<F>` does).
    _owns: std::marker::PhantomData<F>,
}

// SAFETY: `Recycled<F>` owns its `F` as a `Box<F>` does; the free list holds only memory with
// no value in it.
unsafe impl<F: Send> Send for Recycled<F> {}

impl<F> Recycled<F> {
    /// Creates the future directly in its allocation (no stack copy of a large state).
    pub fn new(make: impl FnOnce() -> F) -> Recycled<F> {
        let layout = Layout::new::<F>();
        if layout.size() == 0 {
            let ptr = NonNull::<F>::dangling();
            // SAFETY: a zero-sized write to a dangling, aligned pointer is valid.
            unsafe { ptr.as_ptr().write(make()) };
            return Recycled {
                ptr,
                _owns: std::marker::PhantomData,
            };
        }
        let raw = take(layout);
        // Should `make` panic, the memory goes back rather than leaking.
        struct Back(Layout, Option<NonNull<u8>>);
        impl Drop for Back {
            fn drop(&mut self) {
                if let Some(p) = self.1.take() {
                    give(self.0, p);
                }
            }
        }
        let mut back = Back(layout, Some(raw));
        let value = make();
        back.1 = None;
        let ptr = raw.cast::<F>();
        // SAFETY: `raw` is a live allocation of `F`'s layout holding no value.
        unsafe { ptr.as_ptr().write(value) };
        Recycled {
            ptr,
            _owns: std::marker::PhantomData,
        }
    }
}

impl<F: Future> Future for Recycled<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        // SAFETY: the future stays at `ptr` from `new` until it is dropped in `drop`; nothing
        // moves it (only the pointer moves with `Recycled`).
        unsafe { Pin::new_unchecked(&mut *self.ptr.as_ptr()) }.poll(cx)
    }
}

impl<F> Drop for Recycled<F> {
    fn drop(&mut self) {
        let layout = Layout::new::<F>();
        // SAFETY: `ptr` holds the live `F` written in `new`, dropped here once.
        unsafe { std::ptr::drop_in_place(self.ptr.as_ptr()) };
        if layout.size() != 0 {
            give(layout, self.ptr.cast());
        }
    }
}

/// A collection whose capacity [`Spares`] can keep: emptied when given back.
pub trait Spare: Default {
    /// The largest capacity kept (in elements): one large pipeline does not pin its memory.
    const MAX_KEPT: usize;
    fn capacity(&self) -> usize;
    fn clear(&mut self);
}

impl<T> Spare for Vec<T> {
    const MAX_KEPT: usize = 16;
    fn capacity(&self) -> usize {
        Vec::capacity(self)
    }
    fn clear(&mut self) {
        Vec::clear(self)
    }
}

impl<T> Spare for std::collections::VecDeque<T> {
    const MAX_KEPT: usize = 16;
    fn capacity(&self) -> usize {
        std::collections::VecDeque::capacity(self)
    }
    fn clear(&mut self) {
        std::collections::VecDeque::clear(self)
    }
}

impl Spare for bytes::BytesMut {
    const MAX_KEPT: usize = 8 * 1024;
    fn capacity(&self) -> usize {
        bytes::BytesMut::capacity(self)
    }
    fn clear(&mut self) {
        bytes::BytesMut::clear(self)
    }
}

/// A per-thread free list of empty collections with capacity (declare one per type in a
/// `thread_local!` and use it through [`take_spare`] and [`give_spare`]): a unit's message
/// list, its list of expected answers and its rewritten bytes were allocated and freed per
/// statement (~200 instructions each in the callgrind profile). Only small capacities are
/// kept ([`Spare::MAX_KEPT`]), at most 64 per thread.
pub struct Spares<C>(RefCell<Vec<C>>);

/// An empty collection from this thread's `list`, with a given-back one's capacity when
/// there is one (a new, empty one while the thread ends).
pub fn take_spare<C: Spare>(list: &'static std::thread::LocalKey<Spares<C>>) -> C {
    list.try_with(|s| s.take()).unwrap_or_default()
}

/// Keeps `c`'s capacity in this thread's `list` (see [`Spares::give`]).
pub fn give_spare<C: Spare>(list: &'static std::thread::LocalKey<Spares<C>>, c: C) {
    // While the thread ends, `c` is simply dropped.
    let _ = list.try_with(|s| s.give(c));
}

impl<C: Spare> Spares<C> {
    /// Collections kept per thread.
    const KEEP: usize = 64;

    pub const fn new() -> Spares<C> {
        Spares(RefCell::new(Vec::new()))
    }

    /// An empty collection, with capacity when one was given back.
    pub fn take(&self) -> C {
        self.0
            .try_borrow_mut()
            .ok()
            .and_then(|mut v| v.pop())
            .unwrap_or_default()
    }

    /// Keeps `c`'s capacity for the next [`Spares::take`] (its elements are dropped first).
    pub fn give(&self, mut c: C) {
        let cap = c.capacity();
        if cap == 0 || cap > C::MAX_KEPT {
            return;
        }
        c.clear();
        if let Ok(mut v) = self.0.try_borrow_mut() {
            if v.len() < Self::KEEP {
                v.push(c);
            }
        }
    }
}

impl<C: Spare> Default for Spares<C> {
    fn default() -> Self {
        Spares::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::rc::Rc;

    #[tokio::test]
    async fn runs_the_future_and_reuses_its_memory() {
        let a = Recycled::new(|| async { [7u8; 4096] });
        let first = a.ptr.cast::<u8>();
        assert_eq!(a.await[4095], 7);
        // The next future of the same layout gets the same memory back.
        let b = Recycled::new(|| async { [9u8; 4096] });
        assert_eq!(b.ptr.cast::<u8>(), first);
        assert_eq!(b.await[0], 9);
    }

    #[test]
    fn drops_an_unfinished_future_once() {
        let rc = Rc::new(());
        let held = rc.clone();
        let f = Recycled::new(move || async move {
            let _held = held;
            std::future::pending::<()>().await
        });
        assert_eq!(Rc::strong_count(&rc), 2);
        drop(f);
        assert_eq!(Rc::strong_count(&rc), 1);
    }

    #[test]
    fn spares_keep_small_capacity_only() {
        let spares: Spares<Vec<u32>> = Spares::new();
        let mut v = spares.take();
        assert_eq!(v.capacity(), 0);
        v.extend([1, 2, 3]);
        let cap = v.capacity();
        spares.give(v);
        let again = spares.take();
        assert!(again.is_empty());
        assert_eq!(again.capacity(), cap);
        // A large one goes back to the allocator.
        spares.give(Vec::with_capacity(1000));
        assert_eq!(spares.take().capacity(), 0);
    }

    #[test]
    fn keeps_a_bounded_number() {
        let many: Vec<_> = (0..KEEP + 8)
            .map(|_| Recycled::new(|| async { [1u64; 300] }))
            .collect();
        drop(many);
        let kept = FREE.with(|f| f.borrow().0.len());
        assert!(kept <= KEEP, "{kept}");
    }

    #[test]
    fn a_panic_while_making_returns_the_memory() {
        let before = FREE.with(|f| f.borrow().0.len());
        let r = std::panic::catch_unwind(|| {
            Recycled::new(|| -> std::future::Ready<[u8; 512]> { panic!("make") })
        });
        assert!(r.is_err());
        let after = FREE.with(|f| f.borrow().0.len());
        assert_eq!(after, (before + 1).min(KEEP));
    }
}
