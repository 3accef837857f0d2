//! The protocol state of one server connection, as far as what was sent to it and what it
//! answered tell: the single owner of "is this connection idle?". A server connection goes
//! back to a pool only when [`ServerState::is_idle`] says so, whatever the session that used
//! it believes; everything else (a statement still running, a COPY half done, an extended
//! unit without its Sync, an open or failed transaction, anything tidemark cannot follow) is
//! not idle.
//!
//! It is fed every frame sent ([`ServerState::sent`]) and every frame received
//! ([`ServerState::received`]); it does no I/O.

use std::collections::VecDeque;

use crate::backend::BackendMessage;

/// The transaction status a ReadyForQuery reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TxStatus {
    /// 'I': not in a transaction block.
    Idle,
    /// 'T': in a transaction block.
    InBlock,
    /// 'E': in a failed transaction block (statements refused until it ends).
    Failed,
}

impl TxStatus {
    pub fn from_byte(b: u8) -> Option<TxStatus> {
        match b {
            b'I' => Some(TxStatus::Idle),
            b'T' => Some(TxStatus::InBlock),
            b'E' => Some(TxStatus::Failed),
            _ => None,
        }
    }

    /// The byte ReadyForQuery carries.
    pub fn byte(self) -> u8 {
        match self {
            TxStatus::Idle => b'I',
            TxStatus::InBlock => b'T',
            TxStatus::Failed => b'E',
        }
    }
}

/// What a server connection is doing, for logs and the pool's decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// ReadyForQuery 'I' with nothing outstanding.
    Idle,
    /// Nothing outstanding, inside a transaction block.
    InTransaction,
    /// Nothing outstanding, inside a failed transaction block.
    FailedTransaction,
    /// Extended-protocol messages sent without their Sync yet.
    Unsynced,
    /// This many ReadyForQuery messages are still owed.
    Busy(usize),
    /// In COPY FROM STDIN.
    Copy,
    /// Something tidemark cannot follow happened (a FATAL, an unexpected ReadyForQuery, a
    /// COPY started by the extended protocol): the connection must be closed.
    Lost,
}

/// See the module documentation.
#[derive(Clone, Debug)]
pub struct ServerState {
    /// Sync points sent and not answered by a ReadyForQuery yet, in order (`S`, `Q`, `F`).
    owed: VecDeque<u8>,
    /// Extended-protocol messages sent since the last Sync.
    unsynced: bool,
    /// In COPY FROM STDIN started by a simple query.
    copy_in: bool,
    /// CopyDone/CopyFail sent ahead of the CopyInResponse they end (pipelined COPY data).
    copy_ends_ahead: usize,
    /// Transaction status of the last ReadyForQuery.
    tx: u8,
    lost: bool,
}

impl Default for ServerState {
    fn default() -> Self {
        ServerState {
            owed: VecDeque::new(),
            unsynced: false,
            copy_in: false,
            copy_ends_ahead: 0,
            tx: b'I',
            lost: false,
        }
    }
}

impl ServerState {
    /// Records whole frontend frames written to the server (one or several, concatenated).
    /// Bytes that do not form whole frames make the state [`Phase::Lost`].
    pub fn sent(&mut self, bytes: &[u8]) {
        let mut rest = bytes;
        while !rest.is_empty() {
            if rest.len() < 5 {
                self.lost = true;
                return;
            }
            let tag = rest[0];
            let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
            if len < 4 || rest.len() < 1 + len {
                self.lost = true;
                return;
            }
            self.sent_message(tag);
            rest = &rest[1 + len..];
        }
    }

    /// Records one frontend message by its tag.
    pub fn sent_message(&mut self, tag: u8) {
        match tag {
            b'S' => {
                // The server ignores Sync in COPY IN mode.
                if !self.copy_in {
                    self.owed.push_back(b'S');
                    self.unsynced = false;
                }
            }
            b'Q' | b'F' => {
                // A simple query after unsynced extended messages ends their implicit
                // transaction with its own ReadyForQuery, or, if they failed, is skipped and
                // never answered (then the connection stays busy and is never reused).
                self.owed.push_back(tag);
                self.unsynced = false;
            }
            b'P' | b'B' | b'D' | b'E' | b'C' => self.unsynced = true,
            b'c' | b'f' => {
                if self.copy_in {
                    self.copy_in = false;
                } else {
                    self.copy_ends_ahead += 1;
                }
            }
            // CopyData, Flush, Terminate change nothing that is owed.
            b'd' | b'H' | b'X' => {}
            _ => self.lost = true,
        }
    }

    /// Records one backend message: its tag, and for ReadyForQuery its status byte, for
    /// ErrorResponse whether it is FATAL or PANIC.
    pub fn received(&mut self, msg: BackendMessage, status_or_fatal: u8) {
        match msg {
            BackendMessage::ReadyForQuery => {
                if self.owed.pop_front().is_none() {
                    self.lost = true;
                }
                self.tx = status_or_fatal;
                if !matches!(self.tx, b'I' | b'T' | b'E') {
                    self.lost = true;
                }
            }
            BackendMessage::CopyInResponse => match self.owed.front() {
                // COPY FROM STDIN by a simple query: its ReadyForQuery follows the COPY.
                Some(b'Q') => {
                    if self.copy_ends_ahead > 0 {
                        self.copy_ends_ahead -= 1;
                    } else {
                        self.copy_in = true;
                    }
                }
                // By Execute: which of the Syncs sent meanwhile the server ignores depends on
                // timing tidemark cannot see. Such a connection is not reused.
                _ => self.lost = true,
            },
            BackendMessage::CopyBothResponse => self.lost = true,
            BackendMessage::ErrorResponse => {
                if status_or_fatal != 0 {
                    self.lost = true;
                }
                // An error ends COPY IN mode on the server.
                self.copy_in = false;
            }
            _ => {}
        }
    }

    /// Marks the connection as one that must not be reused.
    pub fn set_lost(&mut self) {
        self.lost = true;
    }

    pub fn phase(&self) -> Phase {
        if self.lost {
            Phase::Lost
        } else if self.copy_in {
            Phase::Copy
        } else if !self.owed.is_empty() {
            Phase::Busy(self.owed.len())
        } else if self.unsynced {
            Phase::Unsynced
        } else {
            match self.tx {
                b'I' => Phase::Idle,
                b'T' => Phase::InTransaction,
                _ => Phase::FailedTransaction,
            }
        }
    }

    /// True only when the server has answered everything it was sent and is outside any
    /// transaction: the one state in which another client may be given the connection.
    pub fn is_idle(&self) -> bool {
        self.phase() == Phase::Idle
    }

    /// ReadyForQuery messages still owed.
    pub fn owed(&self) -> usize {
        self.owed.len()
    }

    pub fn in_copy(&self) -> bool {
        self.copy_in
    }

    pub fn unsynced(&self) -> bool {
        self.unsynced
    }

    /// Transaction status of the last ReadyForQuery.
    pub fn tx_status(&self) -> u8 {
        self.tx
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// What one client message does on the model server.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum Kind {
        Plain,
        Begin,
        Commit,
        Fails,
        CopyIn,
    }

    #[derive(Clone, Copy, Debug)]
    enum Msg {
        Query(Kind),
        Parse,
        Bind,
        Execute(Kind),
        Sync,
        Flush,
        CopyData,
        CopyDone,
        CopyFail,
    }

    impl Msg {
        fn tag(self) -> u8 {
            match self {
                Msg::Query(_) => b'Q',
                Msg::Parse => b'P',
                Msg::Bind => b'B',
                Msg::Execute(_) => b'E',
                Msg::Sync => b'S',
                Msg::Flush => b'H',
                Msg::CopyData => b'd',
                Msg::CopyDone => b'c',
                Msg::CopyFail => b'f',
            }
        }
    }

    #[derive(Clone, Copy, PartialEq, Eq, Debug)]
    enum Copy {
        No,
        Simple,
        Extended,
    }

    /// A PostgreSQL backend reduced to the message flow: what it answers, and whether it is
    /// done with everything it was sent.
    struct Model {
        tx: u8,
        copy: Copy,
        skipping: bool,
        /// Extended messages processed since the last Sync (an implicit transaction is open).
        open_unit: bool,
    }

    impl Model {
        fn kind_effect(&mut self, k: Kind, out: &mut VecDeque<(u8, u8)>) {
            match k {
                Kind::Plain => out.push_back((b'C', 0)),
                Kind::Begin => {
                    self.tx = b'T';
                    out.push_back((b'C', 0));
                }
                Kind::Commit => {
                    self.tx = b'I';
                    out.push_back((b'C', 0));
                }
                Kind::Fails => {
                    if self.tx == b'T' {
                        self.tx = b'E';
                    }
                    out.push_back((b'E', 0));
                }
                Kind::CopyIn => unreachable!(),
            }
        }

        fn process(&mut self, m: Msg, out: &mut VecDeque<(u8, u8)>) {
            match self.copy {
                Copy::Simple => {
                    match m {
                        Msg::CopyDone => {
                            self.copy = Copy::No;
                            out.push_back((b'C', 0));
                            out.push_back((b'Z', self.tx));
                        }
                        Msg::CopyFail => {
                            self.copy = Copy::No;
                            out.push_back((b'E', 0));
                            out.push_back((b'Z', self.tx));
                        }
                        _ => {}
                    }
                    return;
                }
                Copy::Extended => {
                    match m {
                        Msg::CopyDone => {
                            self.copy = Copy::No;
                            out.push_back((b'C', 0));
                        }
                        Msg::CopyFail => {
                            self.copy = Copy::No;
                            self.skipping = true;
                            out.push_back((b'E', 0));
                        }
                        _ => {}
                    }
                    return;
                }
                Copy::No => {}
            }
            if self.skipping && !matches!(m, Msg::Sync) {
                return;
            }
            match m {
                Msg::Query(Kind::CopyIn) => {
                    self.open_unit = false;
                    self.copy = Copy::Simple;
                    out.push_back((b'G', 0));
                }
                Msg::Query(k) => {
                    self.open_unit = false;
                    self.kind_effect(k, out);
                    out.push_back((b'Z', self.tx));
                }
                Msg::Sync => {
                    self.skipping = false;
                    self.open_unit = false;
                    out.push_back((b'Z', self.tx));
                }
                _ if self.skipping => {}
                Msg::Parse => {
                    self.open_unit = true;
                    out.push_back((b'1', 0));
                }
                Msg::Bind => {
                    self.open_unit = true;
                    out.push_back((b'2', 0));
                }
                Msg::Execute(Kind::CopyIn) => {
                    self.open_unit = true;
                    self.copy = Copy::Extended;
                    out.push_back((b'G', 0));
                }
                Msg::Execute(k) => {
                    self.open_unit = true;
                    self.kind_effect(k, out);
                    if k == Kind::Fails {
                        self.skipping = true;
                    }
                }
                Msg::Flush | Msg::CopyData | Msg::CopyDone | Msg::CopyFail => {}
            }
        }
    }

    fn kind() -> impl Strategy<Value = Kind> {
        prop_oneof![
            4 => Just(Kind::Plain),
            1 => Just(Kind::Begin),
            1 => Just(Kind::Commit),
            1 => Just(Kind::Fails),
            1 => Just(Kind::CopyIn),
        ]
    }

    /// A unit a driver could send: a simple query (with its COPY data), or an extended
    /// sequence ended by Sync or only by Flush.
    fn unit() -> impl Strategy<Value = Vec<Msg>> {
        prop_oneof![
            kind().prop_map(|k| if k == Kind::CopyIn {
                vec![Msg::Query(k), Msg::CopyData, Msg::CopyDone]
            } else {
                vec![Msg::Query(k)]
            }),
            Just(vec![Msg::Query(Kind::CopyIn), Msg::CopyData, Msg::CopyFail]),
            (kind(), any::<bool>()).prop_map(|(k, sync)| {
                let mut v = vec![Msg::Parse, Msg::Bind, Msg::Execute(k)];
                if k == Kind::CopyIn {
                    v.extend([Msg::Sync, Msg::CopyData, Msg::CopyDone]);
                }
                v.push(if sync { Msg::Sync } else { Msg::Flush });
                v
            }),
        ]
    }

    proptest! {
        /// Whatever the interleaving of sending, server progress and answers, and wherever
        /// the client vanishes, the tracker calls a connection idle only when the server is
        /// quiescent; and it does call a fully answered, synced connection idle.
        #[test]
        fn idle_only_when_the_server_is_quiescent(
            units in proptest::collection::vec(unit(), 1..8),
            schedule in proptest::collection::vec(0u8..3, 0..200),
        ) {
            let plan: Vec<Msg> = units.into_iter().flatten().collect();
            // A simple query right after an unsynced extended unit may be skipped by the server
            // and leave a ReadyForQuery owed for good: safe, but not reusable.
            let mixed = plan.windows(2).any(|w| {
                matches!(w[0], Msg::Flush) && matches!(w[1], Msg::Query(_))
            });
            let mut st = ServerState::default();
            let mut model = Model { tx: b'I', copy: Copy::No, skipping: false, open_unit: false };
            let mut next = 0usize;
            let mut inbox: VecDeque<Msg> = VecDeque::new();
            let mut out: VecDeque<(u8, u8)> = VecDeque::new();
            let mut extended_copy = false;
            let step = |which: u8, next: &mut usize, inbox: &mut VecDeque<Msg>, out: &mut VecDeque<(u8, u8)>, st: &mut ServerState, model: &mut Model, extended_copy: &mut bool| {
                match which {
                    0 if *next < plan.len() => {
                        let m = plan[*next];
                        *next += 1;
                        st.sent_message(m.tag());
                        inbox.push_back(m);
                    }
                    1 => {
                        if let Some(m) = inbox.pop_front() {
                            if matches!(m, Msg::Execute(Kind::CopyIn)) && !model.skipping {
                                *extended_copy = true;
                            }
                            model.process(m, out);
                        }
                    }
                    _ => {
                        if let Some((tag, b)) = out.pop_front() {
                            st.received(BackendMessage::of(tag), b);
                        }
                    }
                }
            };
            let quiescent = |inbox: &VecDeque<Msg>, out: &VecDeque<(u8, u8)>, model: &Model| {
                // COPY messages outside COPY and Flush are ignored by the server: harmless.
                inbox.iter().all(|m| matches!(m, Msg::CopyData | Msg::CopyDone | Msg::CopyFail | Msg::Flush))
                    && out.is_empty() && model.tx == b'I'
                    && model.copy == Copy::No && !model.skipping && !model.open_unit
            };
            for which in schedule {
                step(which, &mut next, &mut inbox, &mut out, &mut st, &mut model, &mut extended_copy);
                if st.is_idle() {
                    prop_assert!(quiescent(&inbox, &out, &model), "idle while the server is not: {:?}", st);
                }
            }
            // Run everything to the end.
            loop {
                let before = (next, inbox.len(), out.len());
                for which in 0..3 {
                    step(which, &mut next, &mut inbox, &mut out, &mut st, &mut model, &mut extended_copy);
                    if st.is_idle() {
                        prop_assert!(quiescent(&inbox, &out, &model));
                    }
                }
                if before == (next, inbox.len(), out.len()) {
                    break;
                }
            }
            if quiescent(&inbox, &out, &model) && !extended_copy && !mixed {
                prop_assert!(st.is_idle(), "a quiescent connection is not reused: {:?}", st);
            }
        }
    }

    #[test]
    fn phases() {
        let mut s = ServerState::default();
        assert_eq!(s.phase(), Phase::Idle);
        s.sent(&[b'Q', 0, 0, 0, 5, 0]);
        assert_eq!(s.phase(), Phase::Busy(1));
        s.received(BackendMessage::ReadyForQuery, b'T');
        assert_eq!(s.phase(), Phase::InTransaction);
        s.sent(&[b'P', 0, 0, 0, 4, b'H', 0, 0, 0, 4]);
        assert_eq!(s.phase(), Phase::Unsynced);
        s.sent(&[b'S', 0, 0, 0, 4]);
        s.received(BackendMessage::ReadyForQuery, b'E');
        assert_eq!(s.phase(), Phase::FailedTransaction);
        s.received(BackendMessage::ReadyForQuery, b'I');
        assert_eq!(s.phase(), Phase::Lost, "a ReadyForQuery nobody asked for");
        let mut s = ServerState::default();
        s.sent(&[b'Q', 0, 0]);
        assert_eq!(s.phase(), Phase::Lost, "a partial frame");
        let mut s = ServerState::default();
        s.sent(&[b'Q', 0, 0, 0, 5, 0]);
        s.received(BackendMessage::ErrorResponse, 1);
        assert_eq!(s.phase(), Phase::Lost, "FATAL");
    }
}
