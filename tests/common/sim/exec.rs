//! The executor (docs/simulation-plan.md §2.3): one thread, the engine's
//! tasks boxed, and at every step a seed-chosen event among those enabled:
//! poll a ready task, or complete an op in flight (the world's). When
//! neither is possible time jumps to the next timer; when no timer is
//! left either and tasks remain, that is a hang.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::rc::{Rc, Weak};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use ublk_ploop::rng::Rng;

use super::world::World;
use super::SimError;

pub type TaskId = u64;

struct Task {
    fut: Pin<Box<dyn Future<Output = ()>>>,
    name: &'static str,
}

/// Wakes a task by putting its id in the ready set (ordered, so the
/// choice among ready tasks depends on the seed alone; a set, so a task
/// woken twice is polled once).
struct TaskWaker {
    id: TaskId,
    ready: Arc<Mutex<BTreeSet<TaskId>>>,
}

impl Wake for TaskWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref()
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.ready.lock().unwrap().insert(self.id);
    }
}

/// How the scheduler picks among enabled events.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Policy {
    /// Uniform over every enabled event.
    Uniform,
    /// Probabilistic concurrency testing: tasks run by random priority,
    /// and at `points` (event counts) the running task drops to the lowest.
    Pct { points: Vec<u64> },
    /// Lowest ready task first, then the oldest op: the baseline.
    Fifo,
    /// Uniform, except that ops of one kind complete only when nothing
    /// else can happen (a slow device for syncs, say).
    SlowOp { kind: &'static str },
}

enum Event {
    Poll(TaskId),
    Complete(usize),
}

/// A timer's task (None: armed outside any task) and its waker.
type Sleeper = (Option<TaskId>, Waker);

pub struct Exec {
    tasks: RefCell<BTreeMap<TaskId, Task>>,
    ready: Arc<Mutex<BTreeSet<TaskId>>>,
    /// (deadline, sequence) -> the sleeping task and its waker.
    timers: RefCell<BTreeMap<(Duration, u64), Sleeper>>,
    next_id: Cell<u64>,
    next_timer: Cell<u64>,
    sched: RefCell<Rng>,
    pub policy: Policy,
    prio: RefCell<BTreeMap<TaskId, i64>>,
    lowest_prio: Cell<i64>,
    last_polled: Cell<Option<TaskId>>,
    pub events: Cell<u64>,
    /// Events allowed in all (a livelock ends as SimError::Budget).
    pub budget: Cell<u64>,
}

impl Exec {
    pub fn new(sched_seed: u64) -> Exec {
        let mut sched = Rng::new(sched_seed);
        let policy = match sched.below(10) {
            0..=2 => Policy::Uniform,
            3..=6 => Policy::Pct { points: (0..3).map(|_| sched.below(20_000)).collect() },
            7 => {
                const KINDS: [&str; 4] = ["write", "sync_data", "read", "rename"];
                Policy::SlowOp { kind: KINDS[sched.below(4) as usize] }
            }
            _ => Policy::Fifo,
        };
        Exec {
            tasks: RefCell::new(BTreeMap::new()),
            ready: Arc::new(Mutex::new(BTreeSet::new())),
            timers: RefCell::new(BTreeMap::new()),
            next_id: Cell::new(0),
            next_timer: Cell::new(0),
            sched: RefCell::new(sched),
            policy,
            prio: RefCell::new(BTreeMap::new()),
            lowest_prio: Cell::new(0),
            last_polled: Cell::new(None),
            events: Cell::new(0),
            budget: Cell::new(20_000_000),
        }
    }

    pub fn spawn(&self, name: &'static str, fut: Pin<Box<dyn Future<Output = ()>>>) -> TaskId {
        let id = self.next_id.get();
        self.next_id.set(id + 1);
        self.tasks.borrow_mut().insert(id, Task { fut, name });
        let p = self.sched.borrow_mut().below(1 << 30) as i64;
        self.prio.borrow_mut().insert(id, p);
        self.ready.lock().unwrap().insert(id);
        id
    }

    pub fn is_running(&self, id: TaskId) -> bool {
        self.tasks.borrow().contains_key(&id)
    }

    pub fn task_count(&self) -> usize {
        self.tasks.borrow().len()
    }

    /// Wake `waker` once simulated time reaches `deadline`.
    pub fn add_timer(&self, deadline: Duration, task: Option<TaskId>, waker: Waker) {
        let seq = self.next_timer.get();
        self.next_timer.set(seq + 1);
        self.timers.borrow_mut().insert((deadline, seq), (task, waker));
    }

    /// Drop every task (and so every future it holds: ops in flight are
    /// abandoned, handles close) and every timer.
    pub fn drop_all(&self) {
        let tasks = std::mem::take(&mut *self.tasks.borrow_mut());
        let timers = std::mem::take(&mut *self.timers.borrow_mut());
        drop(tasks);
        drop(timers);
        self.ready.lock().unwrap().clear();
        self.prio.borrow_mut().clear();
    }

    fn fire_due_timers(&self, w: &World) {
        let now = w.now();
        loop {
            let first = self.timers.borrow().keys().next().copied();
            match first {
                Some(k) if k.0 <= now => {
                    let (_, waker) = self.timers.borrow_mut().remove(&k).unwrap();
                    waker.wake();
                }
                _ => break,
            }
        }
    }

    /// One event. Ok(false) when there is nothing left to do (no task).
    pub fn step(&self, w: &World) -> Result<bool, SimError> {
        loop {
            self.fire_due_timers(w);
            let ready: Vec<TaskId> = {
                let tasks = self.tasks.borrow();
                let mut r = self.ready.lock().unwrap();
                // Wakes of finished tasks are stale.
                r.retain(|id| tasks.contains_key(id));
                r.iter().copied().collect()
            };
            let ops = w.in_flight();
            if ready.is_empty() && ops == 0 {
                // A finished task's sleep must not move the clock.
                {
                    let tasks = self.tasks.borrow();
                    self.timers.borrow_mut().retain(|_, (t, _)| t.map_or(true, |t| tasks.contains_key(&t)));
                }
                let first = self.timers.borrow().keys().next().copied();
                if let Some((deadline, _)) = first {
                    w.fold(3, deadline.as_nanos() as u64);
                    w.set_now(deadline.max(w.now()));
                    continue;
                }
                if self.tasks.borrow().is_empty() {
                    return Ok(false);
                }
                return Err(SimError::Hang(self.hang_report(w)));
            }
            let n = self.events.get() + 1;
            self.events.set(n);
            if n > self.budget.get() {
                return Err(SimError::Budget(format!("{} events; tasks: {}", n - 1, self.task_names().join(", "))));
            }
            match self.choose(&ready, ops, w) {
                Event::Poll(id) => {
                    w.fold(1, id);
                    if w.tracing() {
                        let name = self.tasks.borrow().get(&id).map_or("?", |t| t.name);
                        eprintln!("sim {:>12?} poll {name}#{id}", w.now());
                    }
                    self.poll_task(id, w)?;
                }
                Event::Complete(i) => {
                    let latency = Duration::from_micros(5 + self.sched.borrow_mut().below(496));
                    w.fold(2, i as u64);
                    w.set_now(w.now() + latency);
                    w.complete(i);
                }
            }
            return Ok(true);
        }
    }

    fn choose(&self, ready: &[TaskId], ops: usize, w: &World) -> Event {
        let mut sched = self.sched.borrow_mut();
        match &self.policy {
            Policy::Uniform => {
                let i = sched.below((ready.len() + ops) as u64) as usize;
                if i < ready.len() {
                    Event::Poll(ready[i])
                } else {
                    Event::Complete(i - ready.len())
                }
            }
            Policy::SlowOp { kind } => {
                let fast: Vec<usize> = w.in_flight_kinds().iter().enumerate().filter(|(_, k)| *k != kind).map(|(i, _)| i).collect();
                if ready.is_empty() && fast.is_empty() {
                    return Event::Complete(sched.below(ops as u64) as usize);
                }
                let i = sched.below((ready.len() + fast.len()) as u64) as usize;
                if i < ready.len() {
                    Event::Poll(ready[i])
                } else {
                    Event::Complete(fast[i - ready.len()])
                }
            }
            Policy::Fifo => match ready.first() {
                Some(&id) => Event::Poll(id),
                None => Event::Complete(0),
            },
            Policy::Pct { points } => {
                if points.contains(&self.events.get()) {
                    if let Some(last) = self.last_polled.get() {
                        let low = self.lowest_prio.get() - 1;
                        self.lowest_prio.set(low);
                        self.prio.borrow_mut().insert(last, low);
                    }
                }
                if !ready.is_empty() && (ops == 0 || sched.chance(50)) {
                    let prio = self.prio.borrow();
                    let best = ready.iter().copied().max_by_key(|id| (prio.get(id).copied().unwrap_or(0), std::cmp::Reverse(*id))).unwrap();
                    Event::Poll(best)
                } else {
                    Event::Complete(sched.below(ops as u64) as usize)
                }
            }
        }
    }

    fn poll_task(&self, id: TaskId, w: &World) -> Result<(), SimError> {
        self.ready.lock().unwrap().remove(&id);
        let Some(mut task) = self.tasks.borrow_mut().remove(&id) else { return Ok(()) };
        self.last_polled.set(Some(id));
        let waker = Waker::from(Arc::new(TaskWaker { id, ready: self.ready.clone() }));
        let mut cx = Context::from_waker(&waker);
        w.set_current(Some((id, waker.clone())));
        let r = catch_unwind(AssertUnwindSafe(|| task.fut.as_mut().poll(&mut cx)));
        w.set_current(None);
        match r {
            Ok(Poll::Pending) => {
                self.tasks.borrow_mut().insert(id, task);
                Ok(())
            }
            Ok(Poll::Ready(())) => {
                self.prio.borrow_mut().remove(&id);
                drop(task);
                Ok(())
            }
            Err(payload) => {
                let msg = payload
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "a panic without a message".into());
                let name = task.name;
                // Dropping the half-run future may panic again: keep that
                // from unwinding through the executor.
                let _ = catch_unwind(AssertUnwindSafe(move || drop(task)));
                Err(SimError::Panic(format!("task '{name}': {msg}")))
            }
        }
    }

    fn task_names(&self) -> Vec<String> {
        self.tasks.borrow().iter().map(|(id, t)| format!("{}#{id}", t.name)).collect()
    }

    fn hang_report(&self, w: &World) -> String {
        let tasks = self.tasks.borrow();
        let list: Vec<String> = tasks.iter().map(|(id, t)| format!("{}#{id} (last op: {})", t.name, w.last_op_of(*id))).collect();
        format!("no task ready, no op in flight, no timer: lost wakeup or deadlock; parked: {}", list.join(", "))
    }
}

/// `Sim::sleep`: ready once simulated time reaches the deadline.
pub struct Sleep {
    pub exec: Weak<Exec>,
    pub world: Rc<World>,
    pub d: Duration,
    pub deadline: Option<Duration>,
}

impl Future for Sleep {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let now = self.world.now();
        let d = self.d;
        let deadline = *self.deadline.get_or_insert(now + d);
        if now >= deadline {
            return Poll::Ready(());
        }
        if let Some(exec) = self.exec.upgrade() {
            exec.add_timer(deadline, self.world.current_task(), cx.waker().clone());
        }
        Poll::Pending
    }
}

/// Give the other tasks a turn (a scheduling point without I/O).
pub async fn yield_now() {
    let mut yielded = false;
    std::future::poll_fn(|cx| {
        if yielded {
            return Poll::Ready(());
        }
        yielded = true;
        cx.waker().wake_by_ref();
        Poll::Pending
    })
    .await
}
