/**
 * Backing files: resolving the name an image stores, and opening it as the node's `backing`
 * child. QEMU: `bdrv_open_backing_file`, `bdrv_get_full_backing_filename`, `path_combine`,
 * `bdrv_dirname` (all in block.c).
 */
import * as path from 'node:path';
import * as fs from 'node:fs';
import { QemuError } from '../aio/error.ts';
import {
  BDRV_O_AUTO_RDONLY,
  BDRV_O_COPY_ON_READ,
  BDRV_O_NO_BACKING,
  BDRV_O_PROTOCOL,
  BDRV_O_RDWR,
  BDRV_O_SNAPSHOT,
  BDRV_O_TEMPORARY,
} from './block-common.ts';
import { path_has_protocol } from './block-driver.ts';
import {
  BDRV_CHILD_COW,
  BDRV_CHILD_FILTERED,
  BDRV_CHILD_PRIMARY,
  BlockDriverState,
  bdrv_attach_child,
  bdrv_primary_bs,
  bdrv_open,
  bdrv_open_reference,
  bdrv_ref,
  bdrv_unref,
  qdict_extract_subqdict,
} from './block-driver-state.ts';

/** What the `backing` option may name: a node (by name, or the node object as for `file`). */
export type BackingReference = string | BlockDriverState;

/**
 * `filename` relative to the directory of `base_path` (a host path or a `prefix:` name).
 * QEMU: `path_combine`. An absolute `filename` comes back unchanged. Surprises, both QEMU's:
 * a `filename` with a protocol prefix is not special here (callers check it first, as
 * `bdrv_get_full_backing_filename` does), and a base with a protocol prefix and no '/' keeps
 * the prefix ("nbd:x" + "y" is "nbd:y").
 */
export function path_combine(base_path: string, filename: string): string {
  if (filename.startsWith('/')) return filename;
  // The directory part ends after the last '/', or after the protocol prefix, whichever is later.
  let len = base_path.lastIndexOf('/') + 1;
  if (path_has_protocol(base_path)) len = Math.max(len, base_path.indexOf(':') + 1);
  return base_path.slice(0, len) + filename;
}

/**
 * The directory that relative names in `bs` are resolved against, ending in '/' (or '' for a
 * relative host name without one): taken from the primary child down to the protocol node,
 * whose file name gives it. QEMU: `bdrv_dirname`. Throws QemuError "Node 'x' is ejected"
 * without a driver, "Cannot generate a base directory for <driver> nodes" without a file name.
 * Surprise: any protocol's name works, so a backing file of an image on "nbd:host:1/a" is looked
 * up as "nbd:host:1/<name>".
 */
export function bdrv_dirname(bs: BlockDriverState): string {
  if (!bs.drv) throw new QemuError(`Node '${bs.node_name}' is ejected`);
  const child = bdrv_primary_bs(bs);
  if (child) return bdrv_dirname(child);
  if (bs.drv.protocol_name && bs.filename) return path_combine(bs.filename, '');
  throw new QemuError(`Cannot generate a base directory for ${bs.drv.format_name} nodes`);
}

/**
 * The backing file name to open: `bs.backing_file` made absolute against the image's directory
 * unless it is absolute or has a protocol prefix. QEMU: `bdrv_get_full_backing_filename`
 * (`bdrv_make_absolute_filename`). Returns '' when the image has no backing file; throws
 * `bdrv_dirname`'s QemuError when a relative name has no directory to go with.
 */
export function bdrv_get_full_backing_filename(bs: BlockDriverState): string {
  const name = bs.backing_file;
  if (!name) return '';
  if (name.startsWith('/') || path_has_protocol(name)) return name;
  return bdrv_dirname(bs) + name;
}

/** Host files of the images whose backing files are being opened, outermost first. */
const opening: string[] = [];

/** A stable identity for a host file name (its real path if it exists; `file:` prefix dropped). */
function host_path_identity(filename: string): string {
  if (filename.startsWith('file:')) filename = filename.slice('file:'.length);
  try {
    return fs.realpathSync(filename);
  } catch {
    return path.resolve(filename);
  }
}

/** The host file under `bs` (through primary children to a `file` node), or null. */
function host_identity(bs: BlockDriverState): string | null {
  for (let b: BlockDriverState | null = bs; b; b = bdrv_primary_bs(b)) {
    if (b.drv?.protocol_name === 'file' && b.filename) return host_path_identity(b.filename);
  }
  return null;
}

/** Whether `bs` is `child` or has it below (any child role). QEMU: `bdrv_recurse_has_child`. */
function bdrv_recurse_has_child(bs: BlockDriverState, child: BlockDriverState): boolean {
  if (bs === child) return true;
  return bs.children.some((c) => bdrv_recurse_has_child(c.bs, child));
}

/** Flags of a backing node: the parent's, read-only, without what applies to the top only. QEMU: `bdrv_backing_options`. */
function bdrv_backing_flags(parent_flags: number): number {
  return (
    parent_flags &
    ~(BDRV_O_RDWR | BDRV_O_AUTO_RDONLY | BDRV_O_COPY_ON_READ | BDRV_O_SNAPSHOT | BDRV_O_TEMPORARY | BDRV_O_PROTOCOL | BDRV_O_NO_BACKING)
  );
}

/**
 * Opens the backing file of `bs` (after its driver's open set `bs.backing_file` and
 * `bs.backing_format`) and attaches it as the `backing` child. QEMU: `bdrv_open_backing_file`.
 * `options` are the `backing.*` options given to the parent (`backing.driver` overrides the
 * stored format; `backing.file.filename` replaces the stored name); `reference` is the
 * `backing` option: a node name (or, aioco, the node object), or null for no backing file. Nothing happens when the image
 * names no backing file and no options are given. The backing node is opened read-only (unless
 * `read-only=off` is among the options) with the parent's other flags. Errors are QemuError;
 * those of opening the backing node get QEMU's "Could not open backing file: " prefix, and then
 * `bs` gets BDRV_O_NO_BACKING. A reference that would make a cycle is refused with "Making 'x' a
 * backing child of 'y' would create a cycle".
 * Surprise (past QEMU): a chain of host files that comes back to an image being opened is
 * refused with "Backing file 'x' creates an infinite loop." where QEMU 7.2 recurses until file
 * locking fails, or without locking never returns.
 */
export function bdrv_open_backing_file(bs: BlockDriverState, options: Record<string, unknown>, reference?: BackingReference | null): void {
  if (bs.backing) return;
  if (reference === null) {
    bs.open_flags |= BDRV_O_NO_BACKING;
    return;
  }
  bs.open_flags &= ~BDRV_O_NO_BACKING;
  const opts = { ...options };
  let backing_filename: string | null = null;
  if (reference !== undefined || opts['file.filename'] !== undefined) {
    // The name comes from the reference or the options.
  } else if (!bs.backing_file && Object.keys(opts).length === 0) {
    return;
  } else {
    backing_filename = bdrv_get_full_backing_filename(bs) || null;
  }
  if (!bs.drv?.supports_backing) throw new QemuError("Driver doesn't support backing files");
  if (reference === undefined && bs.backing_format && opts['driver'] === undefined) opts['driver'] = bs.backing_format;

  const self = host_identity(bs);
  const stack_top = opening.length;
  if (self !== null) opening.push(self);
  let backing_hd: BlockDriverState;
  try {
    const host_name = backing_filename !== null && (!path_has_protocol(backing_filename) || backing_filename.startsWith('file:'));
    if (host_name && opening.includes(host_path_identity(backing_filename!))) {
      throw new QemuError(`Backing file '${bs.backing_file}' creates an infinite loop.`);
    }
    if (typeof reference === 'string') {
      backing_hd = bdrv_open_reference(reference, null, opts);
    } else if (reference instanceof BlockDriverState) {
      // aioco, as for `file`: the node object itself stands for its name.
      if (Object.keys(opts).length > 0) throw new QemuError('Cannot reference an existing block device with additional options or a new filename');
      bdrv_ref(reference);
      backing_hd = reference;
    } else {
      backing_hd = bdrv_open(backing_filename, { 'read-only': 'on', ...opts }, bdrv_backing_flags(bs.open_flags));
    }
  } catch (e) {
    bs.open_flags |= BDRV_O_NO_BACKING;
    throw new QemuError(`Could not open backing file: ${(e as Error).message}`);
  } finally {
    opening.length = stack_top;
  }
  if (bdrv_recurse_has_child(backing_hd, bs)) {
    bdrv_unref(backing_hd);
    throw new QemuError(`Making '${backing_hd.node_name}' a backing child of '${bs.node_name}' would create a cycle`);
  }
  const role = bs.drv.is_filter ? BDRV_CHILD_FILTERED | BDRV_CHILD_PRIMARY : BDRV_CHILD_COW;
  bdrv_attach_child(bs, backing_hd, 'backing', role);
}

/**
 * Takes the `backing` and `backing.*` options out of `options` for `bdrv_open_backing_file`.
 * @internal used by `bdrv_open`.
 */
export function bdrv_extract_backing_options(options: Record<string, unknown>): {
  sub: Record<string, unknown>;
  reference: BackingReference | null | undefined;
} {
  const sub = qdict_extract_subqdict(options, 'backing.');
  let reference: BackingReference | null | undefined;
  if ('backing' in options) {
    const v = options['backing'];
    reference = v === null || v === '' ? null : v instanceof BlockDriverState ? v : String(v);
    delete options['backing'];
  }
  return { sub, reference };
}
