//! How a RELOAD changes the node list. Node ids are indices into `config.nodes` and are held
//! everywhere (the view, pools, the monitor's tasks, sessions, cancel targets), so they never
//! change while the process runs: a node keeps its index by name, a new name is appended, a
//! removed node stays at its index as *retired* (never routed to, polled or given new server
//! connections) and a name added again takes its old slot back.

use tidemark_core::NodeId;

use crate::config::NodeConfig;

/// The node list to install and what changed, by index.
#[derive(Debug, Default)]
pub struct Reconciled {
    pub nodes: Vec<NodeConfig>,
    /// New names, appended at these indices.
    pub added: Vec<NodeId>,
    /// Nodes that were active and are no longer in the file.
    pub retired: Vec<NodeId>,
    /// Active nodes whose host or port changed, and retired nodes that came back: their
    /// pools are drained and the monitor connects again.
    pub moved: Vec<NodeId>,
}

impl Reconciled {
    pub fn changes_nodes(&self) -> bool {
        !(self.added.is_empty() && self.retired.is_empty() && self.moved.is_empty())
    }
}

/// Reconciles the running node list `old` with the reloaded file's `new` (see the module doc).
pub fn reconcile(old: &[NodeConfig], new: &[NodeConfig]) -> Reconciled {
    let mut r = Reconciled {
        nodes: old.to_vec(),
        ..Default::default()
    };
    let mut seen = vec![false; old.len()];
    for n in new {
        let mut n = n.clone();
        n.retired = false;
        match old.iter().position(|o| o.name == n.name) {
            Some(i) => {
                seen[i] = true;
                let o = &old[i];
                if o.retired || o.host != n.host || o.port != n.port {
                    r.moved.push(i);
                }
                r.nodes[i] = n;
            }
            None => {
                r.added.push(r.nodes.len());
                r.nodes.push(n);
            }
        }
    }
    for (i, seen) in seen.into_iter().enumerate() {
        if !seen && !r.nodes[i].retired {
            r.nodes[i].retired = true;
            r.retired.push(i);
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    impl PartialEq for NodeConfig {
        fn eq(&self, o: &Self) -> bool {
            self.name == o.name
                && self.host == o.host
                && self.port == o.port
                && self.application_name == o.application_name
                && self.retired == o.retired
        }
    }
    impl Eq for NodeConfig {}

    fn node(name: &str, port: u16) -> NodeConfig {
        NodeConfig {
            name: name.into(),
            host: "127.0.0.1".into(),
            port,
            application_name: None,
            server_tls: Default::default(),
            retired: false,
        }
    }

    fn retired(mut n: NodeConfig) -> NodeConfig {
        n.retired = true;
        n
    }

    #[test]
    fn unchanged_list_changes_nothing() {
        let old = vec![node("p", 1), node("r1", 2)];
        let r = reconcile(&old, &old);
        assert_eq!(r.nodes, old);
        assert!(!r.changes_nodes());
    }

    #[test]
    fn new_names_are_appended_and_order_in_the_file_does_not_matter() {
        let old = vec![node("p", 1), node("r1", 2)];
        let r = reconcile(&old, &[node("r2", 3), node("r1", 2), node("p", 1)]);
        assert_eq!(r.nodes, vec![node("p", 1), node("r1", 2), node("r2", 3)]);
        assert_eq!(r.added, vec![2]);
        assert!(r.retired.is_empty() && r.moved.is_empty());
    }

    #[test]
    fn removed_nodes_stay_at_their_index_as_retired() {
        let old = vec![node("p", 1), node("r1", 2), node("r2", 3)];
        let r = reconcile(&old, &[node("p", 1), node("r2", 3)]);
        assert_eq!(
            r.nodes,
            vec![node("p", 1), retired(node("r1", 2)), node("r2", 3)]
        );
        assert_eq!(r.retired, vec![1]);
        // Reloading the same file again retires nothing more.
        let again = reconcile(&r.nodes, &[node("p", 1), node("r2", 3)]);
        assert_eq!(again.nodes, r.nodes);
        assert!(!again.changes_nodes());
    }

    #[test]
    fn a_name_added_again_takes_its_slot_back_even_at_another_address() {
        let old = vec![node("p", 1), retired(node("r1", 2))];
        let r = reconcile(&old, &[node("p", 1), node("r1", 9)]);
        assert_eq!(r.nodes, vec![node("p", 1), node("r1", 9)]);
        assert_eq!(r.moved, vec![1]);
        assert!(r.added.is_empty() && r.retired.is_empty());
    }

    #[test]
    fn a_moved_node_keeps_its_index() {
        let old = vec![node("p", 1), node("r1", 2)];
        let mut elsewhere = node("r1", 2);
        elsewhere.host = "10.0.0.7".into();
        let r = reconcile(&old, &[node("p", 1), elsewhere.clone()]);
        assert_eq!(r.nodes, vec![node("p", 1), elsewhere]);
        assert_eq!(r.moved, vec![1]);
        // Other settings of a node (application_name, TLS) change in place.
        let mut renamed = node("r1", 2);
        renamed.application_name = Some("standby1".into());
        let r = reconcile(&old, &[node("p", 1), renamed.clone()]);
        assert_eq!(r.nodes[1], renamed);
        assert!(!r.changes_nodes());
    }

    #[test]
    fn replacing_every_node_keeps_the_old_ones_retired() {
        let old = vec![node("a", 1)];
        let r = reconcile(&old, &[node("b", 2)]);
        assert_eq!(r.nodes, vec![retired(node("a", 1)), node("b", 2)]);
        assert_eq!((r.added, r.retired), (vec![1], vec![0]));
    }
}
