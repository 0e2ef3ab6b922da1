//! A generic graph of shared nodes joined by labelled child edges (QEMU's graph of
//! `BlockDriverState`s and `BdrvChild`ren), usable from several threads at once.
//!
//! Nodes are owned with `Arc`: a request that looked a child up keeps that node alive for as long
//! as it runs, so [`Graph::replace_child`] (QEMU's `bdrv_replace_child`) can swing an edge to a
//! new node while requests are in flight on the old one. Edges never form a cycle. Each edge
//! carries a label ([`EdgeLabel`]) whose name is unique among its parent's children (QEMU's
//! child names: `file`, `backing`, `children.0`, ...), and a parent may have any number of
//! children; lookups go by name.
//!
//! ```
//! use aiocoro_block::graph::Graph;
//!
//! let graph: Graph<&str, &str> = Graph::new();
//! let format = graph.add_node("qcow2");
//! let protocol = graph.add_node("file");
//! graph.attach(format, "file", protocol)?;
//! assert_eq!(graph.child(format, "file").as_deref(), Some(&"file"));
//! assert_eq!(graph.parents(protocol), [(format, "file")]);
//! # Ok::<(), aiocoro_block::graph::GraphError>(())
//! ```

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Names a node of one [`Graph`]. Ids are never reused, so a stale id finds nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(u64);

/// What labels an edge: a name, unique among the children of one parent (a parent holds one
/// child per name), and whatever else the graph's user records per edge (the block layer's
/// [`ChildLabel`](crate::ChildLabel) adds the child's role).
pub trait EdgeLabel: Clone + fmt::Debug {
    /// The child's name under its parent (`file`, `backing`, `child0`).
    fn name(&self) -> &str;

    /// Why one parent cannot hold an edge labelled `self` next to one labelled `other`, if
    /// it cannot: by default, when both have the same name. The graph checks this under its
    /// lock, so two threads attaching at once cannot both pass.
    fn conflict(&self, other: &Self) -> Option<String> {
        (self.name() == other.name()).then(|| format!("it has a child named '{}'", self.name()))
    }
}

/// A label that is only a name.
impl EdgeLabel for &str {
    fn name(&self) -> &str {
        self
    }
}

/// A label that is only a name.
impl EdgeLabel for String {
    fn name(&self) -> &str {
        self
    }
}

/// Why a graph change was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum GraphError {
    /// No node has this id (never added, or removed).
    NoSuchNode(NodeId),
    /// The parent cannot take the new child next to one it has (same name, or a role only
    /// one child may have: [`EdgeLabel::conflict`]).
    Conflict {
        /// The parent.
        parent: NodeId,
        /// Why, as [`EdgeLabel::conflict`] says it.
        reason: String,
    },
    /// The parent has no child of this name.
    NoSuchChild {
        /// The parent.
        parent: NodeId,
        /// The child's name.
        name: String,
    },
    /// The edge would make the child an ancestor of itself.
    Cycle {
        /// The would-be parent.
        parent: NodeId,
        /// The would-be child.
        child: NodeId,
    },
    /// The node still has parents, which would be left pointing at nothing.
    StillAttached(NodeId),
}

impl fmt::Display for GraphError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GraphError::NoSuchNode(id) => write!(f, "no node {id:?} in the graph"),
            GraphError::Conflict { parent, reason } => {
                write!(f, "node {parent:?} cannot take the new child: {reason}")
            }
            GraphError::NoSuchChild { parent, name } => {
                write!(f, "node {parent:?} has no child named '{name}'")
            }
            GraphError::Cycle { parent, child } => {
                write!(f, "attaching {child:?} under {parent:?} would make a cycle")
            }
            GraphError::StillAttached(id) => write!(f, "node {id:?} still has parents"),
        }
    }
}

impl std::error::Error for GraphError {}

/// A refused graph change as an `io::Error` (kind `InvalidInput`), so that graph changes
/// compose with `?` in `io::Result` code; the [`GraphError`] is its inner error.
impl From<GraphError> for std::io::Error {
    fn from(error: GraphError) -> std::io::Error {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, error)
    }
}

/// A parent's hold on one of its children, as a driver keeps it for its requests (QEMU's
/// `BdrvChild`). [`Edge::node`] finds whichever node the edge points at now: a
/// [`Graph::replace_child`] swings every clone of the edge at once.
pub struct Edge<N> {
    cell: Arc<EdgeCell<N>>,
}

/// Invariant: `target` is the node the graph records as the edge's child while the edge is
/// attached.
struct EdgeCell<N> {
    target: RwLock<(NodeId, Arc<N>)>,
}

impl<N> Edge<N> {
    fn new(child: NodeId, node: Arc<N>) -> Self {
        Edge { cell: Arc::new(EdgeCell { target: RwLock::new((child, node)) }) }
    }

    /// The child node now; the `Arc` keeps it alive for as long as the caller needs it,
    /// whatever happens to the graph meanwhile.
    pub fn node(&self) -> Arc<N> {
        self.cell.target.read().unwrap_or_else(PoisonError::into_inner).1.clone()
    }

    /// The id of the child node now.
    pub fn child_id(&self) -> NodeId {
        self.cell.target.read().unwrap_or_else(PoisonError::into_inner).0
    }

    fn point_at(&self, child: NodeId, node: Arc<N>) {
        *self.cell.target.write().unwrap_or_else(PoisonError::into_inner) = (child, node);
    }
}

impl<N> Clone for Edge<N> {
    fn clone(&self) -> Self {
        Edge { cell: self.cell.clone() }
    }
}

impl<N> fmt::Debug for Edge<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Edge").field(&self.child_id()).finish()
    }
}

/// The edges of a node being made by [`Graph::add_node_with`]: each attach hands out the
/// [`Edge`] the new node will keep.
pub struct NewEdges<'g, N, R> {
    graph: &'g Graph<N, R>,
    edges: Vec<(R, NodeId, Edge<N>)>,
}

impl<N, R> std::fmt::Debug for NewEdges<'_, N, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewEdges").field("edges", &self.edges.len()).finish_non_exhaustive()
    }
}

impl<N, R: EdgeLabel> NewEdges<'_, N, R> {
    /// An edge labelled `label` to `child`, for the node being made.
    ///
    /// # Errors
    ///
    /// If `child` is unknown or the label conflicts with one attached before.
    pub fn attach(&mut self, label: R, child: NodeId) -> Result<Edge<N>, GraphError> {
        let node = self.graph.node(child).ok_or(GraphError::NoSuchNode(child))?;
        check_label(self.edges.iter().map(|(l, ..)| l), &label, NEW_NODE)?;
        let edge = Edge::new(child, node);
        self.edges.push((label, child, edge.clone()));
        Ok(edge)
    }

    /// The edges attached so far, as `(label, edge)` in attach order.
    pub fn edges(&self) -> impl Iterator<Item = (&R, &Edge<N>)> {
        self.edges.iter().map(|(label, _, edge)| (label, edge))
    }
}

/// Stands for the node [`Graph::add_node_with`] is making, in errors before it has an id.
pub const NEW_NODE: NodeId = NodeId(0);

struct Entry<N, R> {
    node: Arc<N>,
    /// `(label, child, edge)`, in attach order; one child per name.
    children: Vec<(R, NodeId, Edge<N>)>,
    /// `(parent, label)`: the edges that point here.
    parents: Vec<(NodeId, R)>,
}

/// Nodes of type `N` joined by child edges labelled with `R` (see the module docs).
pub struct Graph<N, R> {
    next_id: AtomicU64,
    /// Invariant: every id in an entry's `children` and `parents` names an entry of the map,
    /// and each edge appears once in its parent's `children` and once in its child's
    /// `parents`, with the same label; the names of one entry's `children` differ.
    entries: RwLock<HashMap<NodeId, Entry<N, R>>>,
}

impl<N, R> std::fmt::Debug for Graph<N, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let nodes = self.entries.try_read().map(|entries| entries.len()).ok();
        f.debug_struct("Graph").field("nodes", &nodes).finish_non_exhaustive()
    }
}

impl<N, R> Default for Graph<N, R> {
    fn default() -> Self {
        Graph { next_id: AtomicU64::new(1), entries: RwLock::new(HashMap::new()) }
    }
}

impl<N, R: EdgeLabel> Graph<N, R> {
    /// An empty graph.
    pub fn new() -> Self {
        Self::default()
    }

    fn read(&self) -> RwLockReadGuard<'_, HashMap<NodeId, Entry<N, R>>> {
        self.entries.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, HashMap<NodeId, Entry<N, R>>> {
        self.entries.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds a node with no edges.
    pub fn add_node(&self, node: N) -> NodeId {
        let id = NodeId(self.next_id.fetch_add(1, Ordering::Relaxed));
        let entry = Entry { node: Arc::new(node), children: Vec::new(), parents: Vec::new() };
        self.write().insert(id, entry);
        id
    }

    /// The node under `id`.
    pub fn node(&self, id: NodeId) -> Option<Arc<N>> {
        self.read().get(&id).map(|entry| entry.node.clone())
    }

    /// The number of nodes.
    pub fn len(&self) -> usize {
        self.read().len()
    }

    /// Whether the graph has no nodes.
    pub fn is_empty(&self) -> bool {
        self.read().is_empty()
    }

    /// Adds a node made by `make`, which attaches the new node's children through
    /// [`NewEdges::attach`] and keeps the [`Edge`]s it gets (a driver opening over its
    /// children). `make` runs without any lock of the graph held, so it may use the graph.
    ///
    /// # Errors
    ///
    /// What `make` returns, or a [`GraphError`] (converted) if a child it attached was
    /// removed before the node could be added.
    pub fn add_node_with<E: From<GraphError>>(
        &self,
        make: impl FnOnce(&mut NewEdges<'_, N, R>) -> Result<N, E>,
    ) -> Result<(NodeId, Arc<N>), E> {
        let mut new_edges = NewEdges { graph: self, edges: Vec::new() };
        let node = Arc::new(make(&mut new_edges)?);
        let id = NodeId(self.next_id.fetch_add(1, Ordering::Relaxed));
        let mut entries = self.write();
        if let Some((_, child, _)) =
            new_edges.edges.iter().find(|(_, child, _)| !entries.contains_key(child))
        {
            return Err(GraphError::NoSuchNode(*child).into());
        }
        for (label, child, _) in &new_edges.edges {
            entries.get_mut(child).expect("checked above").parents.push((id, label.clone()));
        }
        let entry = Entry { node: node.clone(), children: new_edges.edges, parents: Vec::new() };
        entries.insert(id, entry);
        Ok((id, node))
    }

    /// The child of `parent` named `name`, kept alive by the returned `Arc` for as long as
    /// the caller needs it, whatever happens to the graph meanwhile.
    pub fn child(&self, parent: NodeId, name: &str) -> Option<Arc<N>> {
        let entries = self.read();
        let (_, child, _) =
            entries.get(&parent)?.children.iter().find(|(l, ..)| l.name() == name)?;
        entries.get(child).map(|entry| entry.node.clone())
    }

    /// The edge of `parent` to its child named `name`.
    pub fn edge(&self, parent: NodeId, name: &str) -> Option<Edge<N>> {
        let entries = self.read();
        let (.., edge) = entries.get(&parent)?.children.iter().find(|(l, ..)| l.name() == name)?;
        Some(edge.clone())
    }

    /// The children of `parent`, as `(label, child)` in attach order.
    pub fn children(&self, parent: NodeId) -> Vec<(R, NodeId)> {
        self.read()
            .get(&parent)
            .map(|entry| entry.children.iter().map(|(r, c, _)| (r.clone(), *c)).collect())
            .unwrap_or_default()
    }

    /// The edges that point at `child`, as `(parent, label)`.
    pub fn parents(&self, child: NodeId) -> Vec<(NodeId, R)> {
        self.read().get(&child).map(|entry| entry.parents.clone()).unwrap_or_default()
    }

    /// Makes `child` a child of `parent`, labelled `label`; returns the new edge.
    ///
    /// # Errors
    ///
    /// If either node is unknown, the label conflicts with one of the parent's
    /// ([`EdgeLabel::conflict`]), or the edge would close a cycle.
    pub fn attach(&self, parent: NodeId, label: R, child: NodeId) -> Result<Edge<N>, GraphError> {
        let mut entries = self.write();
        check_edge(&entries, parent, child)?;
        let child_node = entries[&child].node.clone();
        let parent_entry = entries.get_mut(&parent).ok_or(GraphError::NoSuchNode(parent))?;
        check_label(parent_entry.children.iter().map(|(l, ..)| l), &label, parent)?;
        let edge = Edge::new(child, child_node);
        parent_entry.children.push((label.clone(), child, edge.clone()));
        entries.get_mut(&child).expect("checked above").parents.push((parent, label));
        Ok(edge)
    }

    /// Removes the edge of `parent` to its child named `name`; returns the child it pointed
    /// at.
    ///
    /// # Errors
    ///
    /// If `parent` is unknown or has no child of that name.
    pub fn detach(&self, parent: NodeId, name: &str) -> Result<NodeId, GraphError> {
        let mut entries = self.write();
        let parent_entry = entries.get_mut(&parent).ok_or(GraphError::NoSuchNode(parent))?;
        let position = child_position(&parent_entry.children, parent, name)?;
        let (_, child, _) = parent_entry.children.remove(position);
        unlink_parent(&mut entries, child, parent, name);
        Ok(child)
    }

    /// Points the edge of `parent` to its child named `name` at `new_child` in one step
    /// (QEMU's `bdrv_replace_child`), keeping the edge's label; returns the old child.
    /// Requests that looked the old child up keep it alive and finish on it; later lookups
    /// find the new one.
    ///
    /// # Errors
    ///
    /// If a node is unknown, `parent` has no child of that name, or the new edge would close
    /// a cycle. The graph is unchanged then.
    pub fn replace_child(
        &self,
        parent: NodeId,
        name: &str,
        new_child: NodeId,
    ) -> Result<NodeId, GraphError> {
        let mut entries = self.write();
        let parent_entry = entries.get(&parent).ok_or(GraphError::NoSuchNode(parent))?;
        let position = child_position(&parent_entry.children, parent, name)?;
        check_edge(&entries, parent, new_child)?;
        let new_node = entries[&new_child].node.clone();
        let slot = &mut entries.get_mut(&parent).expect("checked above").children[position];
        let old_child = std::mem::replace(&mut slot.1, new_child);
        slot.2.point_at(new_child, new_node);
        let label = slot.0.clone();
        unlink_parent(&mut entries, old_child, parent, name);
        entries.get_mut(&new_child).expect("checked above").parents.push((parent, label));
        Ok(old_child)
    }

    /// Removes a node that no edge points at, detaching its own children; returns it.
    ///
    /// # Errors
    ///
    /// If the node is unknown, or still has parents.
    pub fn remove_node(&self, id: NodeId) -> Result<Arc<N>, GraphError> {
        let mut entries = self.write();
        let entry = entries.get(&id).ok_or(GraphError::NoSuchNode(id))?;
        if !entry.parents.is_empty() {
            return Err(GraphError::StillAttached(id));
        }
        let entry = entries.remove(&id).expect("checked above");
        for (label, child, _) in &entry.children {
            unlink_parent(&mut entries, *child, id, label.name());
        }
        Ok(entry.node)
    }
}

/// Checks that an edge `parent` -> `child` may exist: both nodes known, and `parent` is not
/// `child` nor one of its descendants.
fn check_edge<N, R>(
    entries: &HashMap<NodeId, Entry<N, R>>,
    parent: NodeId,
    child: NodeId,
) -> Result<(), GraphError> {
    for id in [parent, child] {
        if !entries.contains_key(&id) {
            return Err(GraphError::NoSuchNode(id));
        }
    }
    let mut pending = vec![child];
    let mut seen = Vec::new();
    while let Some(id) = pending.pop() {
        if id == parent {
            return Err(GraphError::Cycle { parent, child });
        }
        if seen.contains(&id) {
            continue;
        }
        seen.push(id);
        pending.extend(entries[&id].children.iter().map(|(_, c, _)| *c));
    }
    Ok(())
}

/// Refuses `label` if it conflicts with one of `labels`, the parent's.
fn check_label<'a, R: EdgeLabel + 'a>(
    mut labels: impl Iterator<Item = &'a R>,
    label: &R,
    parent: NodeId,
) -> Result<(), GraphError> {
    match labels.find_map(|other| label.conflict(other)) {
        Some(reason) => Err(GraphError::Conflict { parent, reason }),
        None => Ok(()),
    }
}

/// Where `parent`'s child named `name` is in its `children`.
fn child_position<N, R: EdgeLabel>(
    children: &[(R, NodeId, Edge<N>)],
    parent: NodeId,
    name: &str,
) -> Result<usize, GraphError> {
    children
        .iter()
        .position(|(l, ..)| l.name() == name)
        .ok_or_else(|| GraphError::NoSuchChild { parent, name: name.into() })
}

/// Removes the edge from `parent` named `name` from `child`'s parents.
fn unlink_parent<N, R: EdgeLabel>(
    entries: &mut HashMap<NodeId, Entry<N, R>>,
    child: NodeId,
    parent: NodeId,
    name: &str,
) {
    if let Some(entry) = entries.get_mut(&child)
        && let Some(position) =
            entry.parents.iter().position(|(p, l)| *p == parent && l.name() == name)
    {
        entry.parents.remove(position);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain() -> (Graph<String, &'static str>, NodeId, NodeId, NodeId) {
        let graph = Graph::new();
        let top = graph.add_node("qcow2".to_string());
        let backing = graph.add_node("backing".to_string());
        let file = graph.add_node("file".to_string());
        graph.attach(top, "file", file).unwrap();
        graph.attach(top, "backing", backing).unwrap();
        (graph, top, backing, file)
    }

    #[test]
    fn attach_records_both_directions() {
        let (graph, top, backing, file) = chain();
        assert_eq!(graph.children(top), [("file", file), ("backing", backing)]);
        assert_eq!(graph.parents(file), [(top, "file")]);
        assert_eq!(graph.child(top, "backing").as_deref().map(String::as_str), Some("backing"));
        assert!(graph.child(top, "nothing").is_none());
        assert_eq!(graph.len(), 3);
    }

    #[test]
    fn a_name_holds_one_child_and_cycles_are_refused() {
        let (graph, top, backing, file) = chain();
        assert_eq!(
            graph.attach(top, "file", backing).err(),
            Some(GraphError::Conflict {
                parent: top,
                reason: "it has a child named 'file'".into()
            })
        );
        assert_eq!(
            graph.attach(file, "up", top).err(),
            Some(GraphError::Cycle { parent: file, child: top })
        );
        assert_eq!(
            graph.attach(top, "me", top).err(),
            Some(GraphError::Cycle { parent: top, child: top })
        );
        // Sharing a child (a diamond) is fine.
        graph.attach(backing, "file", file).unwrap();
        assert_eq!(graph.parents(file).len(), 2);
    }

    #[test]
    fn a_parent_holds_many_children_each_found_by_its_name() {
        let graph: Graph<String, String> = Graph::new();
        let quorum = graph.add_node("quorum".to_string());
        let children: Vec<NodeId> = (0..3).map(|i| graph.add_node(format!("disk{i}"))).collect();
        for (i, child) in children.iter().enumerate() {
            graph.attach(quorum, format!("children.{i}"), *child).unwrap();
        }
        assert_eq!(graph.children(quorum).len(), 3);
        assert_eq!(graph.child(quorum, "children.2").as_deref().map(String::as_str), Some("disk2"));
        assert_eq!(graph.detach(quorum, "children.1"), Ok(children[1]));
        let names: Vec<String> = graph.children(quorum).into_iter().map(|(l, _)| l).collect();
        assert_eq!(names, ["children.0", "children.2"]);
    }

    #[test]
    fn replacing_a_child_keeps_in_flight_users_safe() {
        let (graph, top, _backing, file) = chain();
        let in_flight = graph.child(top, "file").unwrap();
        let new_file = graph.add_node("new file".to_string());
        assert_eq!(graph.replace_child(top, "file", new_file), Ok(file));
        assert_eq!(*in_flight, "file", "a request that started on the old child keeps it");
        assert_eq!(graph.child(top, "file").as_deref().map(String::as_str), Some("new file"));
        assert!(graph.parents(file).is_empty());
        assert_eq!(graph.parents(new_file), [(top, "file")]);
        // The old node can now go; its Arc outlives its place in the graph.
        let removed = graph.remove_node(file).unwrap();
        assert!(Arc::ptr_eq(&removed, &in_flight));
        assert_eq!(graph.node(file), None);
    }

    #[test]
    fn an_edge_follows_a_replacement() {
        let (graph, top, _backing, file) = chain();
        let edge = graph.edge(top, "file").unwrap();
        assert_eq!(*edge.node(), "file");
        let new_file = graph.add_node("new file".to_string());
        graph.replace_child(top, "file", new_file).unwrap();
        assert_eq!(*edge.node(), "new file");
        assert_eq!(edge.child_id(), new_file);
        assert_ne!(edge.child_id(), file);
    }

    #[test]
    fn a_node_made_over_its_children_keeps_their_edges() {
        let graph: Graph<String, &str> = Graph::new();
        let file = graph.add_node("file".to_string());
        let (top, node) = graph
            .add_node_with(|edges| {
                let edge = edges.attach("file", file)?;
                assert_eq!(
                    edges.attach("file", file).err(),
                    Some(GraphError::Conflict {
                        parent: NEW_NODE,
                        reason: "it has a child named 'file'".into()
                    })
                );
                Ok::<_, GraphError>(format!("raw over {}", edge.node()))
            })
            .unwrap();
        assert_eq!(*node, "raw over file");
        assert_eq!(graph.children(top), [("file", file)]);
        assert_eq!(graph.parents(file), [(top, "file")]);
        let missing = NodeId(999);
        let refused = graph.add_node_with(|edges| {
            edges.attach("file", missing)?;
            Ok::<_, GraphError>(String::new())
        });
        assert_eq!(refused.err(), Some(GraphError::NoSuchNode(missing)));
        assert_eq!(graph.len(), 2, "a refused node is not added");
    }

    #[test]
    fn a_failed_replace_changes_nothing() {
        let (graph, top, backing, file) = chain();
        assert_eq!(
            graph.replace_child(file, "file", top),
            Err(GraphError::NoSuchChild { parent: file, name: "file".into() })
        );
        let leaf = graph.add_node("leaf".to_string());
        graph.attach(file, "x", leaf).unwrap();
        assert_eq!(
            graph.replace_child(file, "x", top),
            Err(GraphError::Cycle { parent: file, child: top })
        );
        assert_eq!(graph.children(file), [("x", leaf)]);
        assert_eq!(graph.children(top), [("file", file), ("backing", backing)]);
    }

    #[test]
    fn removing_needs_a_detached_node_and_detaches_its_children() {
        let (graph, top, backing, file) = chain();
        assert_eq!(graph.remove_node(file).err(), Some(GraphError::StillAttached(file)));
        assert_eq!(graph.detach(top, "file"), Ok(file));
        assert_eq!(
            graph.detach(top, "file").err(),
            Some(GraphError::NoSuchChild { parent: top, name: "file".into() })
        );
        graph.remove_node(top).unwrap();
        assert!(graph.parents(backing).is_empty(), "removing a node detached its children");
        assert_eq!(graph.remove_node(top).err(), Some(GraphError::NoSuchNode(top)));
        assert_eq!(graph.len(), 2);
        assert!(!graph.is_empty());
    }

    #[test]
    fn lookups_race_with_replacements_from_other_threads() {
        let graph = Arc::new(Graph::<u32, &'static str>::new());
        let top = graph.add_node(0);
        let children: Vec<NodeId> = (1..=4).map(|n| graph.add_node(n)).collect();
        graph.attach(top, "file", children[0]).unwrap();
        let readers: Vec<_> = (0..2)
            .map(|_| {
                let graph = graph.clone();
                std::thread::spawn(move || {
                    for _ in 0..10_000 {
                        let child = graph.child(top, "file").expect("always some child");
                        assert!((1..=4).contains(&*child));
                    }
                })
            })
            .collect();
        for round in 0..1_000 {
            let next = children[(round + 1) % 4];
            let current = graph.children(top)[0].1;
            if next != current {
                graph.replace_child(top, "file", next).unwrap();
            }
        }
        for reader in readers {
            reader.join().unwrap();
        }
        assert_eq!(graph.children(top).len(), 1);
        let pointed: usize = children.iter().map(|c| graph.parents(*c).len()).sum();
        assert_eq!(pointed, 1, "exactly one child is attached");
    }
}
