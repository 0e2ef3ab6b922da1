//! The graph of block nodes: a [`Graph`] of [`BlockNode`]s joined by [`ChildLabel`]led edges,
//! which refreshes the nodes' limits whenever an edge changes (QEMU's
//! `bdrv_refresh_limits` on graph changes).

use std::sync::Arc;

use crate::child::{ChildLabel, ChildRole};
use crate::driver::Alignment;
use crate::graph::{Edge, Graph, GraphError, NewEdges, NodeId};
use crate::node::BlockNode;

/// The roles through which a parent's requests reach a child's contents: requests reaching
/// the parent must satisfy those children (QEMU merges the limits of the same roles).
const LIMITING: ChildRole = ChildRole::DATA.union(ChildRole::FILTERED).union(ChildRole::COW);

/// The graph of block nodes ([`Graph`] with [`ChildLabel`]s, and the same methods). Every
/// change of edges made through it (a node made over its children, an attach, a detach, a
/// replaced child) has the nodes above the change ask their drivers for their alignment
/// again, given their children's ([`BlockDriver::alignment`](crate::BlockDriver::alignment)):
/// requests reaching a node satisfy every node below it.
///
/// ```
/// use aiocoro_block::{BlockGraph, ChildRole};
///
/// let path = std::env::temp_dir().join(format!("aiocoro-block-graph-{}", std::process::id()));
/// std::fs::write(&path, vec![0u8; 1 << 20])?;
/// let options = format!("driver=raw,file.filename={},file.cache=none", path.display());
/// aiocoro_block::run_in_coroutine(move |co| {
///     let graph = BlockGraph::new();
///     let (raw, node) = aiocoro_block::open(co, &graph, &options)?;
///     let (label, file) = graph.children(raw).remove(0);
///     assert_eq!(label.name(), "file");
///     assert!(label.role().contains(ChildRole::FILTERED), "raw without a window filters");
///     // Requests reaching the raw node satisfy the O_DIRECT file below it.
///     assert_eq!(node.alignment(), graph.node(file).unwrap().alignment());
///     Ok::<_, std::io::Error>(())
/// })??;
/// std::fs::remove_file(&path)?;
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Default)]
pub struct BlockGraph {
    graph: Graph<BlockNode, ChildLabel>,
}

/// The edges of a block node being made by [`BlockGraph::add_node_with`].
pub type NewChildren<'g> = NewEdges<'g, BlockNode, ChildLabel>;

impl BlockGraph {
    /// An empty graph.
    pub fn new() -> BlockGraph {
        BlockGraph::default()
    }

    /// Adds a node with no children (see [`Graph::add_node`]).
    pub fn add_node(&self, node: BlockNode) -> NodeId {
        self.graph.add_node(node)
    }

    /// Adds a node made by `make` over the children it attaches (see
    /// [`Graph::add_node_with`]), then sets the node's alignment from its driver and its
    /// children's.
    ///
    /// # Errors
    ///
    /// As [`Graph::add_node_with`].
    pub fn add_node_with<E: From<GraphError>>(
        &self,
        make: impl FnOnce(&mut NewChildren<'_>) -> Result<BlockNode, E>,
    ) -> Result<(NodeId, Arc<BlockNode>), E> {
        let (id, node) = self.graph.add_node_with(make)?;
        self.refresh_limits(id);
        Ok((id, node))
    }

    /// The node under `id`.
    pub fn node(&self, id: NodeId) -> Option<Arc<BlockNode>> {
        self.graph.node(id)
    }

    /// The number of nodes.
    pub fn len(&self) -> usize {
        self.graph.len()
    }

    /// Whether the graph has no nodes.
    pub fn is_empty(&self) -> bool {
        self.graph.is_empty()
    }

    /// The child of `parent` named `name` (see [`Graph::child`]).
    pub fn child(&self, parent: NodeId, name: &str) -> Option<Arc<BlockNode>> {
        self.graph.child(parent, name)
    }

    /// The edge of `parent` to its child named `name`.
    pub fn edge(&self, parent: NodeId, name: &str) -> Option<Edge<BlockNode>> {
        self.graph.edge(parent, name)
    }

    /// The children of `parent`, as `(label, child)` in attach order.
    pub fn children(&self, parent: NodeId) -> Vec<(ChildLabel, NodeId)> {
        self.graph.children(parent)
    }

    /// The edges that point at `child`, as `(parent, label)`.
    pub fn parents(&self, child: NodeId) -> Vec<(NodeId, ChildLabel)> {
        self.graph.parents(child)
    }

    /// Makes `child` a child of `parent` (see [`Graph::attach`]) and refreshes the limits
    /// of `parent` and the nodes above it.
    ///
    /// # Errors
    ///
    /// As [`Graph::attach`]; nothing changes then.
    pub fn attach(
        &self,
        parent: NodeId,
        label: ChildLabel,
        child: NodeId,
    ) -> Result<Edge<BlockNode>, GraphError> {
        let edge = self.graph.attach(parent, label, child)?;
        self.refresh_limits(parent);
        Ok(edge)
    }

    /// Removes `parent`'s child named `name` (see [`Graph::detach`]) and refreshes the
    /// limits of `parent` and the nodes above it.
    ///
    /// # Errors
    ///
    /// As [`Graph::detach`]; nothing changes then.
    pub fn detach(&self, parent: NodeId, name: &str) -> Result<NodeId, GraphError> {
        let child = self.graph.detach(parent, name)?;
        self.refresh_limits(parent);
        Ok(child)
    }

    /// Points `parent`'s child named `name` at `new_child` (QEMU's `bdrv_replace_child`,
    /// see [`Graph::replace_child`]), then has `parent` and every node above it ask their
    /// drivers for their alignment again: a new child may need stricter alignment (an
    /// `O_DIRECT` file under a buffered one's parent). Requests already past their backend's
    /// checks are not re-checked: replace children inside drained sections of the backends
    /// above, as QEMU does.
    ///
    /// # Errors
    ///
    /// As [`Graph::replace_child`]; nothing changes then.
    pub fn replace_child(
        &self,
        parent: NodeId,
        name: &str,
        new_child: NodeId,
    ) -> Result<NodeId, GraphError> {
        let old = self.graph.replace_child(parent, name, new_child)?;
        self.refresh_limits(parent);
        Ok(old)
    }

    /// Removes a node that no edge points at (see [`Graph::remove_node`]).
    ///
    /// # Errors
    ///
    /// As [`Graph::remove_node`].
    pub fn remove_node(&self, id: NodeId) -> Result<Arc<BlockNode>, GraphError> {
        self.graph.remove_node(id)
    }

    /// The strictest alignment among `parent`'s children that limit it ([`LIMITING`]).
    fn children_alignment(&self, parent: NodeId) -> Alignment {
        self.graph
            .children(parent)
            .into_iter()
            .filter(|(label, _)| label.role().intersects(LIMITING))
            .filter_map(|(_, child)| self.graph.node(child))
            .fold(Alignment::BYTE, |strictest, child| strictest.join(child.alignment()))
    }

    /// Refreshes the alignment of `from`, and of every node above one whose alignment
    /// changed (a node reached twice, through a diamond, is refreshed again, so it ends up
    /// with all of its children's refreshed values).
    fn refresh_limits(&self, from: NodeId) {
        let mut pending = vec![(from, true)];
        while let Some((id, forced)) = pending.pop() {
            let Some(node) = self.graph.node(id) else { continue };
            if node.refresh_alignment(self.children_alignment(id)) || forced {
                pending.extend(self.graph.parents(id).into_iter().map(|(above, _)| (above, false)));
            }
        }
    }
}

impl std::fmt::Debug for BlockGraph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockGraph").field("nodes", &self.len()).finish()
    }
}
