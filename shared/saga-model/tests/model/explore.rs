//! An explicit-state model checker: breadth first over every state a model
//! can reach, each visited once.
//!
//! A state is known by a 128-bit fingerprint of its hash, as TLC and SPIN
//! keep theirs (two independent 64-bit lanes): were they ideal, the chance
//! that two of ten million states share one would be below 10^-24. Besides
//! the fingerprints it keeps, per state, its parent, the index of the
//! action that reached it and its successors, so that:
//!
//! - a broken [`Model::always`] property, or an action the model refuses,
//!   is reported with the shortest path that leads to it (breadth first:
//!   no shorter path exists);
//! - [`Model::ended`] is checked in every state from which no action leads
//!   elsewhere (the system has nothing left to do, or only steps that
//!   cannot be decided yet);
//! - the graph is checked to have no cycle, so that every run, however
//!   the actions are chosen, comes to such a state: with that, `ended` is
//!   an *eventually* property of every run, not of some.
//!
//! Paths are stored as action indices and replayed from the initial state
//! to be shown, which keeps a few bytes per state.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hash, Hasher};
use std::time::{Duration, Instant};

/// What the checker needs of a model. `actions` must list the same actions
/// in the same order for equal states: paths are replayed by index.
pub(crate) trait Model {
    type State: Clone + Hash;
    type Action: Clone;

    fn init(&self) -> Self::State;
    fn actions(&self, state: &Self::State, actions: &mut Vec<Self::Action>);
    /// The state after `action`, or why taking it broke the model (a step
    /// refused).
    fn next(&self, state: &Self::State, action: &Self::Action) -> Result<Self::State, String>;
    /// What must hold in every reachable state.
    fn always(&self, state: &Self::State) -> Result<(), String>;
    /// What must hold where nothing is left to happen.
    fn ended(&self, state: &Self::State) -> Result<(), String>;
    fn describe(&self, action: &Self::Action) -> String;
}

/// What a complete exploration saw.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Report {
    pub(crate) states: usize,
    pub(crate) transitions: usize,
    /// States from which nothing leads elsewhere: the runs' ends.
    pub(crate) ends: usize,
    /// The longest of the shortest paths to a state.
    pub(crate) depth: usize,
    pub(crate) elapsed: Duration,
}

/// A property broken, with the shortest path to it.
#[derive(Debug, Clone)]
pub(crate) struct Counterexample {
    /// Each action of the path, described, in order.
    pub(crate) path: Vec<String>,
    pub(crate) violation: String,
}

impl std::fmt::Display for Counterexample {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "{} steps:", self.path.len())?;
        for (i, step) in self.path.iter().enumerate() {
            writeln!(f, "{:>3}. {step}", i + 1)?;
        }
        write!(f, "then: {}", self.violation)
    }
}

/// Explores every state `model` can reach; the first property broken (on a
/// shortest path) ends it.
pub(crate) fn explore<M: Model>(model: &M) -> Result<Report, Counterexample> {
    let started = Instant::now();
    let init = model.init();
    let mut ids: HashMap<u128, u32, BuildHasherDefault<Prehashed>> = HashMap::default();
    // Per state, in the order found (which is the order explored): how it
    // was reached, and where its successors start in `successors`.
    let mut reached: Vec<(u32, u16)> = vec![(u32::MAX, 0)];
    let mut depths: Vec<u32> = vec![0];
    let mut successors: Vec<u32> = Vec::new();
    let mut starts: Vec<usize> = Vec::new();
    let mut ends = 0;
    ids.insert(fingerprint(&init), 0);
    if let Err(violation) = model.always(&init) {
        return Err(Counterexample {
            path: Vec::new(),
            violation,
        });
    }
    let mut queue = VecDeque::from([(0u32, init)]);
    let mut actions = Vec::new();
    while let Some((id, state)) = queue.pop_front() {
        starts.push(successors.len());
        let own = fingerprint(&state);
        actions.clear();
        model.actions(&state, &mut actions);
        let mut leads_elsewhere = false;
        for (index, action) in actions.iter().enumerate() {
            let index = u16::try_from(index).expect("fewer than 65,536 actions in a state");
            let fail = |violation: String| {
                let mut path = path_to(model, &reached, id);
                path.push(model.describe(action));
                Counterexample { path, violation }
            };
            let next = model.next(&state, action).map_err(fail)?;
            let print = fingerprint(&next);
            if print == own {
                continue;
            }
            leads_elsewhere = true;
            let known = ids.len();
            let next_id = *ids
                .entry(print)
                .or_insert_with(|| u32::try_from(known).expect("fewer than 2^32 states"));
            successors.push(next_id);
            if next_id as usize == known {
                model.always(&next).map_err(fail)?;
                reached.push((id, index));
                depths.push(depths[id as usize] + 1);
                queue.push_back((next_id, next));
            }
        }
        if !leads_elsewhere {
            ends += 1;
            model.ended(&state).map_err(|violation| Counterexample {
                path: path_to(model, &reached, id),
                violation: format!("nothing is left to happen, yet {violation}"),
            })?;
        }
    }
    starts.push(successors.len());
    if let Some(on_cycle) = on_a_cycle(&starts, &successors) {
        return Err(Counterexample {
            path: path_to(model, &reached, on_cycle),
            violation: "this state lies on a cycle: a run can go round it for ever without ending"
                .into(),
        });
    }
    Ok(Report {
        states: reached.len(),
        transitions: successors.len(),
        ends,
        depth: depths.iter().copied().max().unwrap_or(0) as usize,
        elapsed: started.elapsed(),
    })
}

/// The actions from the initial state to state `id`, replayed by index.
fn path_to<M: Model>(model: &M, reached: &[(u32, u16)], mut id: u32) -> Vec<String> {
    let mut indices = Vec::new();
    while id != 0 {
        let (parent, index) = reached[id as usize];
        indices.push(index);
        id = parent;
    }
    let mut state = model.init();
    let mut actions = Vec::new();
    let mut path = Vec::new();
    for index in indices.into_iter().rev() {
        actions.clear();
        model.actions(&state, &mut actions);
        let action = &actions[usize::from(index)];
        path.push(model.describe(action));
        state = model
            .next(&state, action)
            .expect("a step replayed as it was taken");
    }
    path
}

/// A state on a cycle of the graph (successors of state `i` at
/// `successors[starts[i]..starts[i + 1]]`), if it has one: Kahn's
/// algorithm peels off every state no remaining state leads to; what is
/// left leads into a cycle, and following it from any state left reaches
/// one.
fn on_a_cycle(starts: &[usize], successors: &[u32]) -> Option<u32> {
    let states = starts.len() - 1;
    let next = |i: usize| &successors[starts[i]..starts[i + 1]];
    let mut incoming = vec![0u32; states];
    for &to in successors {
        incoming[to as usize] += 1;
    }
    let mut free: Vec<usize> = (0..states).filter(|&i| incoming[i] == 0).collect();
    let mut peeled = 0;
    while let Some(i) = free.pop() {
        peeled += 1;
        for &to in next(i) {
            incoming[to as usize] -= 1;
            if incoming[to as usize] == 0 {
                free.push(to as usize);
            }
        }
    }
    if peeled == states {
        return None;
    }
    // Walk among the states left until one comes round again.
    let mut seen = vec![false; states];
    let mut at = (0..states).find(|&i| incoming[i] > 0)?;
    while !seen[at] {
        seen[at] = true;
        at = *next(at).iter().find(|&&to| incoming[to as usize] > 0)? as usize;
    }
    Some(at as u32)
}

/// A state's 128-bit fingerprint.
fn fingerprint<T: Hash>(value: &T) -> u128 {
    let mut hasher = Fingerprinter::default();
    value.hash(&mut hasher);
    hasher.finish128()
}

/// Two independent 64-bit lanes, each folding every word in with wyhash's
/// multiply-and-fold step under secrets of its own. The derived `Hash`
/// of a world writes hundreds of small integers; this takes each in one
/// multiplication, where SipHash spent half the check's time on them.
#[derive(Debug)]
struct Fingerprinter {
    lanes: [u64; 2],
    words: u64,
}

const SECRETS: [[u64; 2]; 2] = [
    [0xa076_1d64_78bd_642f, 0xe703_7ed1_a0b4_28db],
    [0x8ebc_6af0_9c88_c6e3, 0x5899_65cc_7537_4cc3],
];

impl Default for Fingerprinter {
    fn default() -> Self {
        Self {
            lanes: [0x243f_6a88_85a3_08d3, 0x1319_8a2e_0370_7344],
            words: 0,
        }
    }
}

fn fold(a: u64, b: u64) -> u64 {
    let product = u128::from(a) * u128::from(b);
    (product as u64) ^ ((product >> 64) as u64)
}

impl Fingerprinter {
    fn word(&mut self, word: u64) {
        self.words += 1;
        for (lane, [first, second]) in self.lanes.iter_mut().zip(SECRETS) {
            *lane = fold(*lane ^ first, word ^ second);
        }
    }

    fn finish128(&self) -> u128 {
        let [a, b] = self.lanes;
        let a = fold(a ^ SECRETS[0][1], self.words ^ SECRETS[0][0]);
        let b = fold(b ^ SECRETS[1][1], self.words ^ SECRETS[1][0]);
        (u128::from(a) << 64) | u128::from(b)
    }
}

impl Hasher for Fingerprinter {
    fn finish(&self) -> u64 {
        self.finish128() as u64
    }

    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            self.word(u64::from_le_bytes(chunk.try_into().expect("8 bytes")));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut last = [0u8; 8];
            last[..rest.len()].copy_from_slice(rest);
            // The length in the top byte: "a" and "a\0" differ.
            last[7] ^= rest.len() as u8;
            self.word(u64::from_le_bytes(last));
        }
    }

    fn write_u8(&mut self, value: u8) {
        self.word(u64::from(value));
    }

    fn write_u16(&mut self, value: u16) {
        self.word(u64::from(value));
    }

    fn write_u32(&mut self, value: u32) {
        self.word(u64::from(value));
    }

    fn write_u64(&mut self, value: u64) {
        self.word(value);
    }

    fn write_usize(&mut self, value: usize) {
        self.word(value as u64);
    }

    fn write_i64(&mut self, value: i64) {
        self.word(value as u64);
    }
}

/// The fingerprints are hashes already: the table takes their low bits.
#[derive(Debug, Default)]
struct Prehashed(u64);

impl Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.0 = (self.0 << 8) | u64::from(byte);
        }
    }

    fn write_u128(&mut self, value: u128) {
        self.0 = value as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A counter that counts up to a limit by one or two, or round and
    /// round: a small model whose graph is known.
    struct Counter {
        limit: u8,
        wraps: bool,
        bad: Option<u8>,
    }

    impl Model for Counter {
        type State = u8;
        type Action = u8;

        fn init(&self) -> u8 {
            0
        }

        fn actions(&self, state: &u8, actions: &mut Vec<u8>) {
            actions.extend([1, 2].into_iter().filter(|step| state + step <= self.limit));
            if self.wraps && *state == self.limit {
                actions.push(0);
            }
        }

        fn next(&self, state: &u8, action: &u8) -> Result<u8, String> {
            Ok(if *action == 0 { 0 } else { state + action })
        }

        fn always(&self, state: &u8) -> Result<(), String> {
            match self.bad {
                Some(bad) if *state == bad => Err(format!("reached {bad}")),
                _ => Ok(()),
            }
        }

        fn ended(&self, state: &u8) -> Result<(), String> {
            if *state == self.limit {
                Ok(())
            } else {
                Err(format!("stopped at {state}"))
            }
        }

        fn describe(&self, action: &u8) -> String {
            format!("+{action}")
        }
    }

    #[test]
    fn every_state_is_visited_once_and_the_depth_is_the_shortest_path() {
        let report = explore(&Counter {
            limit: 6,
            wraps: false,
            bad: None,
        })
        .unwrap();
        assert_eq!(report.states, 7);
        // Each of 0..=4 steps by one and by two, 5 only by one.
        assert_eq!(report.transitions, 11);
        assert_eq!(report.ends, 1);
        assert_eq!(report.depth, 3);
    }

    #[test]
    fn a_broken_property_comes_with_the_shortest_path() {
        let found = explore(&Counter {
            limit: 9,
            wraps: false,
            bad: Some(5),
        })
        .unwrap_err();
        assert_eq!(found.path, ["+1", "+2", "+2"]);
        assert_eq!(found.violation, "reached 5");
    }

    #[test]
    fn a_cycle_is_found() {
        let found = explore(&Counter {
            limit: 3,
            wraps: true,
            bad: None,
        })
        .unwrap_err();
        assert!(found.violation.contains("cycle"), "{found}");
    }
}
