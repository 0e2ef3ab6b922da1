//! The numbers of the NBD protocol (server side): magics, flags, option and reply types,
//! commands and error values, as the NBD protocol document names them.

/// `NBDMAGIC`, the first eight bytes a newstyle server sends.
pub const INIT_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: the newstyle magic, also the prefix of every option a client sends.
pub const OPTION_MAGIC: u64 = 0x4948_4156_454f_5054;
/// The prefix of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// The prefix of every transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// The prefix of every transmission request once extended headers are negotiated.
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
/// The prefix of every simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// The prefix of every structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// The prefix of every reply chunk once extended headers are negotiated.
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

/// Handshake flag: the server speaks fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: the server can leave out the 124 zero bytes after `EXPORT_NAME`.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: the client speaks fixed newstyle.
pub const CLIENT_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: the client wants no 124 zero bytes after `EXPORT_NAME`.
pub const CLIENT_NO_ZEROES: u32 = 1 << 1;

/// Option: choose an export by name and start transmission (old style, no error reply).
pub const OPT_EXPORT_NAME: u32 = 1;
/// Option: end the negotiation.
pub const OPT_ABORT: u32 = 2;
/// Option: list the exports.
pub const OPT_LIST: u32 = 3;
/// Option: describe an export.
pub const OPT_INFO: u32 = 6;
/// Option: describe an export and start transmission.
pub const OPT_GO: u32 = 7;
/// Option: use structured replies.
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// Option: list the metadata contexts a query matches.
pub const OPT_LIST_META_CONTEXT: u32 = 9;
/// Option: select the metadata contexts `BLOCK_STATUS` reports.
pub const OPT_SET_META_CONTEXT: u32 = 10;
/// Option: use extended (64-bit) request and reply headers.
pub const OPT_EXTENDED_HEADERS: u32 = 11;

/// Reply: the option is done.
pub const REP_ACK: u32 = 1;
/// Reply: one export of a `LIST`.
pub const REP_SERVER: u32 = 2;
/// Reply: one piece of information of an `INFO` / `GO`.
pub const REP_INFO: u32 = 3;
/// Reply: one metadata context of a `LIST_META_CONTEXT` / `SET_META_CONTEXT`.
pub const REP_META_CONTEXT: u32 = 4;
/// Error replies have this bit set.
const REP_ERROR: u32 = 1 << 31;
/// Error reply: the option is not supported.
pub const REP_ERR_UNSUP: u32 = REP_ERROR | 1;
/// Error reply: the option is malformed.
pub const REP_ERR_INVALID: u32 = REP_ERROR | 3;
/// Error reply: the export does not exist.
pub const REP_ERR_UNKNOWN: u32 = REP_ERROR | 6;
/// Error reply: the option's payload is too large for the server.
pub const REP_ERR_TOO_BIG: u32 = REP_ERROR | 9;
/// Error reply: extended headers are (or must be) in use (to `STRUCTURED_REPLY` once they
/// are negotiated, which they take precedence over).
pub const REP_ERR_EXT_HEADER_REQD: u32 = REP_ERROR | 10;

/// Information: the export's size and transmission flags.
pub const INFO_EXPORT: u16 = 0;
/// Information: the export's name.
pub const INFO_NAME: u16 = 1;
/// Information: the export's description.
pub const INFO_DESCRIPTION: u16 = 2;
/// Information: the export's block size constraints.
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flag: the other flags are valid.
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
/// Transmission flag: the export is read-only.
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
/// Transmission flag: the server handles `FLUSH`.
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
/// Transmission flag: the server handles the `FUA` command flag.
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
/// Transmission flag: the server handles `TRIM`.
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
/// Transmission flag: the server handles `WRITE_ZEROES`.
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// Transmission flag: the server handles the `DF` command flag (structured replies only).
pub const TFLAG_SEND_DF: u16 = 1 << 7;
/// Transmission flag: a flush on one connection covers the writes of every connection.
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;
/// Transmission flag: the server handles `CACHE`.
pub const TFLAG_SEND_CACHE: u16 = 1 << 10;
/// Transmission flag: the server handles the `FAST_ZERO` command flag.
pub const TFLAG_SEND_FAST_ZERO: u16 = 1 << 11;

/// Command: read.
pub const CMD_READ: u16 = 0;
/// Command: write.
pub const CMD_WRITE: u16 = 1;
/// Command: disconnect.
pub const CMD_DISC: u16 = 2;
/// Command: flush.
pub const CMD_FLUSH: u16 = 3;
/// Command: trim (discard).
pub const CMD_TRIM: u16 = 4;
/// Command: load a range into the server's caches.
pub const CMD_CACHE: u16 = 5;
/// Command: write zeroes.
pub const CMD_WRITE_ZEROES: u16 = 6;
/// Command: the status of a range in the selected metadata contexts.
pub const CMD_BLOCK_STATUS: u16 = 7;

/// Command flag: force unit access (the data is stable when the reply comes).
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// Command flag (`WRITE_ZEROES`): do not punch a hole.
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// Command flag (`READ`): answer in one chunk ("don't fragment").
pub const CMD_FLAG_DF: u16 = 1 << 2;
/// Command flag (`BLOCK_STATUS`): one extent per context.
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// Command flag (`WRITE_ZEROES`): fail with `ENOTSUP` unless the zeroing is fast.
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
/// Command flag (extended headers): the length is that of a payload that follows.
pub const CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;

/// Reply flag: the last chunk of a structured reply.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
/// Chunk type: no payload (a reply without data).
pub const REPLY_TYPE_NONE: u16 = 0;
/// Chunk type: data read at an offset.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// Chunk type: a range that reads as zeroes.
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// Chunk type: extents of one metadata context (32-bit lengths).
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Chunk type: extents of one metadata context (64-bit lengths, extended headers).
pub const REPLY_TYPE_BLOCK_STATUS_EXT: u16 = 6;
/// Chunk type: an error.
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) | 1;
/// Chunk type: an error at an offset.
pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) | 2;

/// `base:allocation` state: the extent is a hole (not allocated).
pub const STATE_HOLE: u32 = 1 << 0;
/// `base:allocation` state: the extent reads as zeroes.
pub const STATE_ZERO: u32 = 1 << 1;

/// Error value: operation not permitted.
pub const EPERM: u32 = 1;
/// Error value: input/output error.
pub const EIO: u32 = 5;
/// Error value: invalid argument.
pub const EINVAL: u32 = 22;
/// Error value: no space left.
pub const ENOSPC: u32 = 28;
/// Error value: the request is not supported (a `FAST_ZERO` that would be slow).
pub const ENOTSUP: u32 = 95;
