/**
 * blkdebug: a filter driver for error injection, QEMU 7.2's block/blkdebug.c rebuilt on aioco's
 * public API (docs/devel/blkdebug.txt; reference: qemu-block.md 3.2).
 *
 * Filename `blkdebug:[CONFIG]:IMAGE` (an empty CONFIG is allowed: `blkdebug::img`), or options:
 * `config` (an ini file with `[inject-error]` / `[set-state]` sections, values quoted), the child
 * `image` (`x-image` filename or `image.*` options), limit overrides `align`, `max-transfer`,
 * `opt-write-zero`, `max-write-zero`, `opt-discard`, `max-discard`, and rules
 * `inject-error.N.{event,state,iotype,errno,sector,once,immediately}`,
 * `set-state.N.{event,state,new_state}`.
 *
 * State machine (the normative part): the state starts at 1. When a block driver above emits an
 * event (`yield* bdrv_co_debug_event(child_bs, 'write_aio')`), every rule registered for that
 * event whose `state` is 0 or the current state is processed in list order (rules are inserted
 * at the head); `set-state` rules pick the new state, applied once all rules were processed; if
 * at least one `inject-error` rule matched, the active-rule list is replaced by the matching
 * rules. I/O through the node (read, write, write-zeroes, discard, flush, block-status) then
 * fails with the first active rule whose sector (if any) lies in the request and whose iotype
 * mask includes the request's type; `once` removes the rule after it fired; `immediately=off`
 * (default) reschedules the request coroutine once through the event loop before returning the
 * error.
 *
 * Breakpoints (qemu-io's `break`, `resume`, `remove_break`, `wait_break`; qemu-block.md 3.2
 * rule 4): `bdrv_debug_breakpoint(bs, event, tag)` adds a `suspend` rule at the head of the
 * event's list. When the event fires in a request coroutine (`yield* bdrv_co_debug_event`), the
 * rule is removed, `blkdebug: Suspended request 'TAG'` is printed on stdout, and the request
 * yields until `bdrv_debug_resume` (which prints `blkdebug: Resuming request 'TAG'` and enters
 * it). Suspend rules exist only through that API: QEMU 7.2 has no `suspend` section in config
 * files or options (`There is no option group 'suspend'`).
 *
 * Register with `bdrv_blkdebug_init()` (idempotent).
 */
import { readFileSync } from 'node:fs';
import { match, P } from 'ts-pattern';
import {
  aio_co_schedule,
  bdrv_co_flush,
  bdrv_co_pdiscard,
  bdrv_co_preadv,
  bdrv_co_pwritev,
  bdrv_co_pwrite_zeroes,
  bdrv_debug_event,
  bdrv_find_format,
  bdrv_getlength,
  bdrv_open_file_child,
  bdrv_register,
  qemu_coroutine_enter,
  qemu_coroutine_self,
  qemu_coroutine_yield,
  qemu_get_current_aio_context,
  strerror,
  BDRV_BLOCK_OFFSET_VALID,
  BDRV_BLOCK_RAW,
  BDRV_REQ_FUA,
  BDRV_REQ_MAY_UNMAP,
  BDRV_REQ_NO_FALLBACK,
  BDRV_REQ_WRITE_UNCHANGED,
  BDRV_SECTOR_SIZE,
  EIO,
  ENOENT,
  ENOTSUP,
  INT_MAX,
  QemuError,
  type BlockDriver,
  type BlockDriverState,
  type BlockStatusOut,
  type Coroutine,
  type CoroutineFn,
  type QEMUIOVector,
  qemu_strtosz,
} from '../../src/index.ts';

/** QEMU 7.2's `BlkdebugEvent` names, in QAPI order. */
export const BLKDEBUG_EVENTS = [
  'l1_update',
  'l1_grow_alloc_table',
  'l1_grow_write_table',
  'l1_grow_activate_table',
  'l2_load',
  'l2_update',
  'l2_update_compressed',
  'l2_alloc_cow_read',
  'l2_alloc_write',
  'read_aio',
  'read_backing_aio',
  'read_compressed',
  'write_aio',
  'write_compressed',
  'vmstate_load',
  'vmstate_save',
  'cow_read',
  'cow_write',
  'reftable_load',
  'reftable_grow',
  'reftable_update',
  'refblock_load',
  'refblock_update',
  'refblock_update_part',
  'refblock_alloc',
  'refblock_alloc_hookup',
  'refblock_alloc_write',
  'refblock_alloc_write_blocks',
  'refblock_alloc_write_table',
  'refblock_alloc_switch_table',
  'cluster_alloc',
  'cluster_alloc_bytes',
  'cluster_free',
  'flush_to_os',
  'flush_to_disk',
  'pwritev_rmw_head',
  'pwritev_rmw_after_head',
  'pwritev_rmw_tail',
  'pwritev_rmw_after_tail',
  'pwritev',
  'pwritev_zero',
  'pwritev_done',
  'empty_image_prepare',
  'l1_shrink_write_table',
  'l1_shrink_free_l2_clusters',
  'cor_write',
  'cluster_alloc_space',
  'none',
] as const;
export type BlkdebugEvent = (typeof BLKDEBUG_EVENTS)[number];

/** QEMU's `BlkdebugIOType`, in QAPI order (the bit of each in a rule's iotype mask). */
export const BLKDEBUG_IO_TYPES = ['read', 'write', 'write-zeroes', 'discard', 'flush', 'block-status'] as const;
export type BlkdebugIOType = (typeof BLKDEBUG_IO_TYPES)[number];
const IO_READ = 0;
const IO_WRITE = 1;
const IO_WRITE_ZEROES = 2;
const IO_DISCARD = 3;
const IO_FLUSH = 4;
const IO_BLOCK_STATUS = 5;
/** Default mask: every type but block-status. */
const DEFAULT_IOTYPE_MASK = (1 << IO_READ) | (1 << IO_WRITE) | (1 << IO_WRITE_ZEROES) | (1 << IO_DISCARD) | (1 << IO_FLUSH);

export interface BlkdebugInjectRule {
  action: 'inject-error';
  event: BlkdebugEvent;
  /** 0: any state. */
  state: number;
  error: number;
  immediately: boolean;
  once: boolean;
  /** Byte offset of the sector the request must cover, or -1 for any. */
  offset: number;
  iotype_mask: number;
}
export interface BlkdebugSetStateRule {
  action: 'set-state';
  event: BlkdebugEvent;
  state: number;
  new_state: number;
}
/** A breakpoint (QEMU: ACTION_SUSPEND), added by `bdrv_debug_breakpoint` only; state is always 0. */
export interface BlkdebugSuspendRule {
  action: 'suspend';
  event: BlkdebugEvent;
  state: number;
  tag: string;
}
export type BlkdebugRule = BlkdebugInjectRule | BlkdebugSetStateRule | BlkdebugSuspendRule;

/** A request waiting at a breakpoint (QEMU: BlkdebugSuspendedReq). */
export interface BlkdebugSuspendedReq {
  co: Coroutine;
  tag: string;
}

/** The driver's per-node state (C's BDRVBlkdebugState). */
export interface BDRVBlkdebugState {
  state: number;
  /** Rules per event; index 0 is the list head. */
  rules: Map<BlkdebugEvent, BlkdebugRule[]>;
  /** Rules armed by the last event that matched an inject-error rule; index 0 is the head. */
  active_rules: BlkdebugInjectRule[];
  /** Requests waiting at a breakpoint; index 0 is the list head (the latest). */
  suspended_reqs: BlkdebugSuspendedReq[];
  align: number;
  max_transfer: number;
  opt_write_zero: number;
  max_write_zero: number;
  opt_discard: number;
  max_discard: number;
  config_file: string | null;
  image_file: string | null;
}

// ---------------------------------------------------------------------------------------------
// QemuOpts-like option parsing (util/qemu-option.c, util/qemu-config.c), the part blkdebug uses.

type OptType = 'string' | 'number' | 'bool' | 'size';
interface OptsList {
  name: 'inject-error' | 'set-state';
  desc: Record<string, OptType>;
}
const inject_error_opts: OptsList = {
  name: 'inject-error',
  desc: {
    event: 'string',
    state: 'number',
    iotype: 'string',
    errno: 'number',
    sector: 'number',
    once: 'bool',
    immediately: 'bool',
  },
};
const set_state_opts: OptsList = {
  name: 'set-state',
  desc: { event: 'string', state: 'number', new_state: 'number' },
};
const config_groups = [inject_error_opts, set_state_opts];

/** A parsed option group instance (C's QemuOpts): values already validated. */
interface Opts {
  list: OptsList;
  id: string | null;
  values: Map<string, string | number | boolean>;
}

/** `qemu_strtou64(value, NULL, 0, &n)`: decimal, 0x hex or 0 octal, optional sign; as uint64. */
function strtou64(value: string): bigint | 'einval' | 'erange' {
  const m = /^[ \t\n\v\f\r]*([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)$/.exec(value);
  if (!m) return 'einval';
  const digits = m[2]!;
  const v = /^0[xX]/.test(digits) ? BigInt(digits) : digits.length > 1 && digits[0] === '0' ? BigInt('0o' + digits.slice(1)) : BigInt(digits);
  if (v > 0xffffffffffffffffn) return 'erange';
  return m[1] === '-' ? BigInt.asUintN(64, -v) : v;
}

/** QEMU's textual form of a QDict value when absorbed into QemuOpts (null: not a scalar). */
function qobject_to_opt_string(v: unknown): string | null {
  return match(v)
    .with(P.string, (s) => s)
    .with(P.number, (n) => String(n))
    .with(P.bigint, (n) => String(n))
    .with(P.boolean, (b) => (b ? 'on' : 'off'))
    .otherwise(() => null);
}

/** Validates `value` for option `name` of type `type` (QEMU: `qemu_opt_parse`). */
function opt_parse(name: string, type: OptType, value: string): string | number | boolean {
  return match(type)
    .with('string', () => value)
    .with('bool', () => {
      if (['on', 'yes', 'true', 'y'].includes(value)) return true;
      if (['off', 'no', 'false', 'n'].includes(value)) return false;
      throw new QemuError(`Parameter '${name}' expects 'on' or 'off'`);
    })
    .with('number', () => {
      const n = strtou64(value);
      if (n === 'erange') throw new QemuError(`Value '${value}' out of range for parameter '${name}'`);
      if (n === 'einval') throw new QemuError(`Parameter '${name}' expects a number`);
      // Stored as int64 (C's uint64_t read back into int/int64_t fields).
      return Number(BigInt.asIntN(64, n));
    })
    .with('size', () => {
      const n = qemu_strtosz(value);
      if (n === 'erange') throw new QemuError(`Value '${value}' is out of range for parameter '${name}'`);
      if (n === 'einval') throw new QemuError(`Parameter '${name}' expects a non-negative number below 2^64`);
      return Number(n);
    })
    .exhaustive();
}

/** `qemu_opt_set`: unknown names are refused, values validated. */
function opt_set(opts: Opts, name: string, value: string): void {
  const type = opts.list.desc[name];
  if (type === undefined) throw new QemuError(`Invalid parameter '${name}'`);
  opts.values.set(name, opt_parse(name, type, value));
}

function opts_create(list: OptsList, id: string | null, all: Opts[]): Opts {
  if (id !== null) {
    if (!/^[A-Za-z][A-Za-z0-9_.-]*$/.test(id)) throw new QemuError(`Parameter 'id' expects an identifier`);
    if (all.some((o) => o.list === list && o.id === id)) throw new QemuError(`Duplicate ID '${id}' for ${list.name}`);
  }
  const opts: Opts = { list, id, values: new Map() };
  all.push(opts);
  return opts;
}

/**
 * `qemu_opts_absorb_qdict`: moves the entries of `dict` that `opts` knows into it (validated);
 * unknown keys stay in `dict`.
 */
function opts_absorb(opts: Opts, dict: Record<string, unknown>): void {
  for (const key of Object.keys(dict)) {
    if (opts.list.desc[key] === undefined) continue;
    const s = qobject_to_opt_string(dict[key]);
    if (s === null) continue;
    opt_set(opts, key, s);
    delete dict[key];
  }
}

/** `qemu_config_parse` for `lists`: the `-readconfig` ini syntax. Appends to `all`. */
function blkdebug_parse_config_text(text: string, all: Opts[] = []): Opts[] {
  const lines = text.split('\n');
  if (lines[lines.length - 1] === '') lines.pop();
  let group: string | null = null;
  let section: Array<[string, string]> | null = null;
  let sectionId: string | null = null;
  const flush = (): void => {
    if (group === null || section === null) return;
    const list = config_groups.find((l) => l.name === group);
    if (!list) throw new QemuError(`There is no option group '${group}'`);
    const opts = opts_create(list, sectionId, all);
    for (const [k, v] of section) opt_set(opts, k, v);
  };
  for (const line of lines) {
    if (line === '' || line.startsWith('#')) continue;
    if (line.startsWith('[')) {
      // `[group "id"]` or `[group]` (sscanf semantics: the closing bracket is not checked).
      const withId = /^\[([^ \t\n\v\f\r]{1,63})[ \t\n\v\f\r]*"([^"]{1,63})"/.exec(line);
      const plain = withId ? null : /^\[([^\]]{1,63})/.exec(line);
      if (withId || plain) {
        flush();
        group = (withId ?? plain)![1]!;
        sectionId = withId ? withId[2]! : null;
        section = [];
        continue;
      }
    }
    // ` key = "value"` (sscanf: the key is any non-blank token; a missing value is "").
    const kv = /^[ \t\n\v\f\r]*([^ \t\n\v\f\r]{1,63})/.exec(line);
    if (!kv) throw new QemuError('parse error');
    const rest = line.slice(kv[0].length);
    const val = /^[ \t\n\v\f\r]*=[ \t\n\v\f\r]*"([^"]{0,1023})/.exec(rest);
    if (section === null) throw new QemuError('no group defined');
    section.push([kv[1]!, val ? val[1]! : '']);
  }
  flush();
  return all;
}

/**
 * `qemu_config_parse_qdict(options, config_groups)`: takes the `inject-error.*` and `set-state.*`
 * keys out of `options` (numbered sections `N.key`, or one unnumbered section) into `all`.
 */
function config_parse_qdict(options: Record<string, unknown>, all: Opts[]): void {
  for (const list of config_groups) {
    const prefix = list.name + '.';
    const sub: Record<string, unknown> = {};
    for (const k of Object.keys(options)) {
      if (k.startsWith(prefix)) {
        sub[k.slice(prefix.length)] = options[k];
        delete options[k];
      }
    }
    if (Object.keys(sub).length === 0) continue;
    // qdict_array_split: sections 0, 1, 2... as long as they exist.
    const sections: Array<Record<string, unknown> | 'scalar'> = [];
    for (let i = 0; ; i++) {
      const p = `${i}.`;
      const keys = Object.keys(sub).filter((k) => k.startsWith(p));
      if (keys.length === 0) {
        if (String(i) in sub) {
          sections.push('scalar');
          delete sub[String(i)];
          continue;
        }
        break;
      }
      const sec: Record<string, unknown> = {};
      for (const k of keys) {
        sec[k.slice(p.length)] = sub[k];
        delete sub[k];
      }
      sections.push(sec);
    }
    if (Object.keys(sub).length > 0) {
      const opts = opts_create(list, null, all);
      opts_absorb(opts, sub);
      const left = Object.keys(sub);
      if (left.length > 0) throw new QemuError(`[${list.name}] section doesn't support the option '${left[0]}'`);
      continue;
    }
    sections.forEach((sec, i) => {
      if (sec === 'scalar') throw new QemuError(`[${list.name}] section (index ${i}) does not consist of keys`);
      const opts = opts_create(list, `${list.name}.${i}`, all);
      opts_absorb(opts, sec);
      const left = Object.keys(sec);
      if (left.length > 0) throw new QemuError(`[${list.name}] section doesn't support the option '${left[0]}'`);
    });
  }
}

/** `qapi_enum_parse` of a BlkdebugEvent name. */
function parse_event(name: string): BlkdebugEvent {
  const ev = BLKDEBUG_EVENTS.find((e) => e === name);
  if (ev === undefined) throw new QemuError(`Invalid parameter '${name}'`);
  return ev;
}

/** C `int` truncation of an option number. */
function to_int(n: number): number {
  return Number(BigInt.asIntN(32, BigInt(n)));
}

/** Builds the rule for one section (QEMU: `add_rule`) and inserts it at the head of its event list. */
function add_rule(s: BDRVBlkdebugState, opts: Opts): void {
  const event_name = opts.values.get('event') as string | undefined;
  if (event_name === undefined) throw new QemuError('Missing event name for rule');
  const event = parse_event(event_name);
  const num = (k: string, def: number): number => (opts.values.has(k) ? (opts.values.get(k) as number) : def);
  const bool = (k: string): boolean => (opts.values.get(k) as boolean | undefined) ?? false;
  const state = to_int(num('state', 0));
  const rule: BlkdebugRule = match(opts.list.name)
    .with('inject-error', (): BlkdebugInjectRule => {
      const iotype = opts.values.get('iotype') as string | undefined;
      let iotype_mask = DEFAULT_IOTYPE_MASK;
      if (iotype !== undefined) {
        const i = BLKDEBUG_IO_TYPES.findIndex((t) => t === iotype);
        if (i < 0) throw new QemuError(`Invalid parameter '${iotype}'`);
        iotype_mask = 1 << i;
      }
      const sector = num('sector', -1);
      return {
        action: 'inject-error',
        event,
        state,
        error: to_int(num('errno', EIO)),
        once: bool('once'),
        immediately: bool('immediately'),
        offset: sector === -1 ? -1 : sector * BDRV_SECTOR_SIZE,
        iotype_mask,
      };
    })
    .with('set-state', (): BlkdebugSetStateRule => ({ action: 'set-state', event, state, new_state: to_int(num('new_state', 0)) }))
    .exhaustive();
  const list = s.rules.get(event);
  if (list) list.unshift(rule);
  else s.rules.set(event, [rule]);
}

/** Reads rules from the config file (if any) and the options (QEMU: `read_config`). */
function read_config(s: BDRVBlkdebugState, filename: string | null, options: Record<string, unknown>): void {
  const all: Opts[] = [];
  if (filename !== null) {
    let text: string;
    try {
      text = readFileSync(filename, 'latin1');
    } catch (e) {
      const errno = typeof (e as NodeJS.ErrnoException).errno === 'number' ? (e as NodeJS.ErrnoException).errno! : -EIO;
      throw new QemuError(`Could not read blkdebug config file: ${strerror(errno)}`);
    }
    blkdebug_parse_config_text(text, all);
  }
  config_parse_qdict(options, all);
  for (const o of all) if (o.list === inject_error_opts) add_rule(s, o);
  for (const o of all) if (o.list === set_state_opts) add_rule(s, o);
}

// ---------------------------------------------------------------------------------------------
// The driver.

function state_of(bs: BlockDriverState): BDRVBlkdebugState {
  return bs.opaque as BDRVBlkdebugState;
}

/** `blkdebug:[CONFIG]:IMAGE` ⇒ `config`, `x-image`; a filename without the prefix is `x-image`. */
function blkdebug_parse_filename(filename: string, options: Record<string, unknown>): void {
  if (!filename.startsWith('blkdebug:')) {
    options['x-image'] = filename;
    return;
  }
  const rest = filename.slice('blkdebug:'.length);
  const c = rest.indexOf(':');
  if (c < 0) throw new QemuError('blkdebug requires both config file and image path');
  if (c > 0) options['config'] = rest.slice(0, c);
  options['x-image'] = rest.slice(c + 1);
}

const runtime_opts: Record<string, OptType> = {
  config: 'string',
  'x-image': 'string',
  align: 'size',
  'max-transfer': 'size',
  'opt-write-zero': 'size',
  'max-write-zero': 'size',
  'opt-discard': 'size',
  'max-discard': 'size',
};

function blkdebug_open(bs: BlockDriverState, options: Record<string, unknown>, _flags: number): void {
  // qemu_opts_absorb_qdict(runtime_opts): validated before anything else.
  const opts = new Map<string, string | number | boolean>();
  for (const [k, type] of Object.entries(runtime_opts)) {
    if (!(k in options)) continue;
    const v = qobject_to_opt_string(options[k]);
    if (v === null) continue;
    opts.set(k, opt_parse(k, type, v));
    delete options[k];
  }
  const s: BDRVBlkdebugState = {
    state: 1,
    rules: new Map(),
    active_rules: [],
    suspended_reqs: [],
    align: 0,
    max_transfer: 0,
    opt_write_zero: 0,
    max_write_zero: 0,
    opt_discard: 0,
    max_discard: 0,
    config_file: (opts.get('config') as string | undefined) ?? null,
    image_file: (opts.get('x-image') as string | undefined) ?? null,
  };
  bs.opaque = s;

  read_config(s, s.config_file, options);
  s.state = 1;

  bdrv_open_file_child(s.image_file, options, 'image', bs);
  const file = bs.file!.bs;

  bs.supported_write_flags = BDRV_REQ_WRITE_UNCHANGED | (BDRV_REQ_FUA & file.supported_write_flags);
  bs.supported_zero_flags =
    BDRV_REQ_WRITE_UNCHANGED | ((BDRV_REQ_FUA | BDRV_REQ_MAY_UNMAP | BDRV_REQ_NO_FALLBACK) & file.supported_zero_flags);

  const size = (k: string): number => (opts.get(k) as number | undefined) ?? 0;
  const aligned = (v: number, a: number): boolean => v % a === 0;
  s.align = size('align');
  if (s.align && (s.align >= INT_MAX || (s.align & (s.align - 1)) !== 0)) {
    throw new QemuError(`Cannot meet constraints with align ${s.align}`);
  }
  const align = Math.max(s.align, file.bl.request_alignment);

  s.max_transfer = size('max-transfer');
  if (s.max_transfer && (s.max_transfer >= INT_MAX || !aligned(s.max_transfer, align))) {
    throw new QemuError(`Cannot meet constraints with max-transfer ${s.max_transfer}`);
  }
  s.opt_write_zero = size('opt-write-zero');
  if (s.opt_write_zero && (s.opt_write_zero >= INT_MAX || !aligned(s.opt_write_zero, align))) {
    throw new QemuError(`Cannot meet constraints with opt-write-zero ${s.opt_write_zero}`);
  }
  s.max_write_zero = size('max-write-zero');
  if (s.max_write_zero && (s.max_write_zero >= INT_MAX || !aligned(s.max_write_zero, Math.max(s.opt_write_zero, align)))) {
    throw new QemuError(`Cannot meet constraints with max-write-zero ${s.max_write_zero}`);
  }
  s.opt_discard = size('opt-discard');
  if (s.opt_discard && (s.opt_discard >= INT_MAX || !aligned(s.opt_discard, align))) {
    throw new QemuError(`Cannot meet constraints with opt-discard ${s.opt_discard}`);
  }
  s.max_discard = size('max-discard');
  if (s.max_discard && (s.max_discard >= INT_MAX || !aligned(s.max_discard, Math.max(s.opt_discard, align)))) {
    throw new QemuError(`Cannot meet constraints with max-discard ${s.max_discard}`);
  }

  bdrv_debug_event(bs, 'none');
}

function blkdebug_close(bs: BlockDriverState): void {
  const s = state_of(bs);
  if (!s) return;
  s.rules.clear();
  s.active_rules = [];
}

function blkdebug_getlength(bs: BlockDriverState): number {
  return bdrv_getlength(bs.file!.bs);
}

function blkdebug_refresh_limits(bs: BlockDriverState): void {
  const s = state_of(bs);
  if (s.align) bs.bl.request_alignment = s.align;
  if (s.max_transfer) bs.bl.max_transfer = s.max_transfer;
  if (s.opt_write_zero) bs.bl.pwrite_zeroes_alignment = s.opt_write_zero;
  if (s.max_write_zero) bs.bl.max_pwrite_zeroes = s.max_write_zero;
  if (s.opt_discard) bs.bl.pdiscard_alignment = s.opt_discard;
  if (s.max_discard) bs.bl.max_pdiscard = s.max_discard;
}

/** Removes `rule` from its event's list (QEMU: `remove_rule`). */
function remove_rule(s: BDRVBlkdebugState, rule: BlkdebugRule): void {
  const list = s.rules.get(rule.event);
  if (!list) return;
  const i = list.indexOf(rule);
  if (i >= 0) list.splice(i, 1);
}

/**
 * Records the running coroutine as suspended at `rule` and drops the rule: a breakpoint fires
 * once. QEMU: `suspend_request` (the yield comes after all rules of the event were processed).
 */
function suspend_request(s: BDRVBlkdebugState, rule: BlkdebugSuspendRule): BlkdebugSuspendedReq {
  const r: BlkdebugSuspendedReq = { co: qemu_coroutine_self(), tag: rule.tag };
  remove_rule(s, rule);
  s.suspended_reqs.unshift(r);
  process.stdout.write(`blkdebug: Suspended request '${r.tag}'\n`);
  return r;
}

/**
 * Processes the rules of `event` (QEMU: `blkdebug_co_debug_event` / `process_rule`), then
 * yields once per suspend rule that matched. The new state is applied before the yields.
 */
function* blkdebug_co_debug_event(bs: BlockDriverState, event: string): CoroutineFn<void> {
  const s = state_of(bs);
  const rules = s.rules.get(event as BlkdebugEvent);
  if (!rules) return;
  let new_state = s.state;
  let injected = false;
  let suspended: BlkdebugSuspendedReq[] | null = null;
  for (const rule of [...rules]) {
    if (rule.state && rule.state !== s.state) continue;
    if (rule.action === 'inject-error') {
      if (!injected) {
        s.active_rules = [];
        injected = true;
      }
      s.active_rules.unshift(rule);
    } else if (rule.action === 'set-state') {
      new_state = rule.new_state;
    } else {
      (suspended ??= []).push(suspend_request(s, rule));
    }
  }
  s.state = new_state;
  if (suspended === null) return;
  try {
    for (let n = suspended.length; n > 0; n--) yield* qemu_coroutine_yield();
  } finally {
    // Records still listed were never resumed: the yield threw (no coroutine to suspend) or the
    // caller unwound us (bdrv_debug_event); a later resume must not enter them.
    for (const r of suspended) {
      const i = s.suspended_reqs.indexOf(r);
      if (i >= 0) s.suspended_reqs.splice(i, 1);
    }
  }
}

/** Adds a suspend rule for `event` (QEMU: `blkdebug_debug_breakpoint`); -ENOENT for an unknown event. */
function blkdebug_debug_breakpoint(bs: BlockDriverState, event: string, tag: string): number {
  const s = state_of(bs);
  const ev = BLKDEBUG_EVENTS.find((e) => e === event);
  if (ev === undefined) return -ENOENT;
  const rule: BlkdebugSuspendRule = { action: 'suspend', event: ev, state: 0, tag };
  const list = s.rules.get(ev);
  if (list) list.unshift(rule);
  else s.rules.set(ev, [rule]);
  return 0;
}

/**
 * Resumes the latest request suspended with `tag`, or with `all` every one (QEMU:
 * `resume_req_by_tag`). The request runs until it yields again before this returns.
 * Surprise (as 7.2): with `all` the result is always -ENOENT, the search ends when none is left.
 */
function resume_req_by_tag(s: BDRVBlkdebugState, tag: string, all: boolean): number {
  for (;;) {
    const i = s.suspended_reqs.findIndex((r) => r.tag === tag);
    if (i < 0) return -ENOENT;
    const r = s.suspended_reqs[i]!;
    process.stdout.write(`blkdebug: Resuming request '${r.tag}'\n`);
    s.suspended_reqs.splice(i, 1);
    qemu_coroutine_enter(r.co);
    if (!all) return 0;
  }
}

function blkdebug_debug_resume(bs: BlockDriverState, tag: string): number {
  return resume_req_by_tag(state_of(bs), tag, false);
}

/**
 * Removes every suspend rule tagged `tag` and resumes every request suspended with it (QEMU:
 * `blkdebug_debug_remove_breakpoint`). 0 if a rule was removed, else -ENOENT, even when
 * requests were resumed (resume_req_by_tag's quirk: qemu-io prints "Could not remove breakpoint").
 */
function blkdebug_debug_remove_breakpoint(bs: BlockDriverState, tag: string): number {
  const s = state_of(bs);
  let ret = -ENOENT;
  for (const list of s.rules.values()) {
    for (const rule of [...list]) {
      if (rule.action === 'suspend' && rule.tag === tag) {
        remove_rule(s, rule);
        ret = 0;
      }
    }
  }
  if (resume_req_by_tag(s, tag, true) === 0) ret = 0;
  return ret;
}

function blkdebug_debug_is_suspended(bs: BlockDriverState, tag: string): boolean {
  return state_of(bs).suspended_reqs.some((r) => r.tag === tag);
}

/** Error injection on I/O (QEMU: `rule_check`): 0, or -errno of the first matching active rule. */
function* rule_check(bs: BlockDriverState, offset: number, bytes: number, iotype: number): CoroutineFn<number> {
  const s = state_of(bs);
  const rule = s.active_rules.find(
    (r) => (r.offset === -1 || (bytes > 0 && r.offset >= offset && r.offset < offset + bytes)) && (r.iotype_mask & (1 << iotype)) !== 0,
  );
  if (!rule || !rule.error) return 0;
  const { immediately, error } = rule;
  if (rule.once) {
    s.active_rules.splice(s.active_rules.indexOf(rule), 1);
    remove_rule(s, rule);
  }
  if (!immediately) {
    aio_co_schedule(qemu_get_current_aio_context(), qemu_coroutine_self());
    yield* qemu_coroutine_yield();
  }
  return -error;
}

/** The block layer's guarantees that blkdebug double-checks (QEMU asserts them). */
function check(cond: boolean, what: string): void {
  if (!cond) throw new QemuError(`blkdebug: block layer guarantee violated: ${what}`);
}

function* blkdebug_co_preadv(bs: BlockDriverState, offset: number, bytes: number, qiov: QEMUIOVector, flags: number): CoroutineFn<number> {
  const a = bs.bl.request_alignment;
  check(offset % a === 0 && bytes % a === 0, 'read aligned to request_alignment');
  if (bs.bl.max_transfer) check(bytes <= bs.bl.max_transfer, 'read within max_transfer');
  const err = yield* rule_check(bs, offset, bytes, IO_READ);
  if (err) return err;
  return yield* bdrv_co_preadv(bs.file!, offset, bytes, qiov, flags);
}

function* blkdebug_co_pwritev(bs: BlockDriverState, offset: number, bytes: number, qiov: QEMUIOVector, flags: number): CoroutineFn<number> {
  const a = bs.bl.request_alignment;
  check(offset % a === 0 && bytes % a === 0, 'write aligned to request_alignment');
  if (bs.bl.max_transfer) check(bytes <= bs.bl.max_transfer, 'write within max_transfer');
  const err = yield* rule_check(bs, offset, bytes, IO_WRITE);
  if (err) return err;
  return yield* bdrv_co_pwritev(bs.file!, offset, bytes, qiov, flags);
}

function* blkdebug_co_pwrite_zeroes(bs: BlockDriverState, offset: number, bytes: number, flags: number): CoroutineFn<number> {
  const align = Math.max(bs.bl.request_alignment, bs.bl.pwrite_zeroes_alignment);
  // Requests smaller than the zero alignment are refused so that the write fallback is exercised.
  if (bytes < align) {
    check(
      offset % align === 0 || (offset + bytes) % align === 0 || Math.ceil(offset / align) === Math.ceil((offset + bytes) / align),
      'small zero write does not cross an alignment boundary',
    );
    return -ENOTSUP;
  }
  check(offset % align === 0 && bytes % align === 0, 'zero write aligned');
  if (bs.bl.max_pwrite_zeroes) check(bytes <= bs.bl.max_pwrite_zeroes, 'zero write within max_pwrite_zeroes');
  const err = yield* rule_check(bs, offset, bytes, IO_WRITE_ZEROES);
  if (err) return err;
  return yield* bdrv_co_pwrite_zeroes(bs.file!, offset, bytes, flags);
}

function* blkdebug_co_pdiscard(bs: BlockDriverState, offset: number, bytes: number): CoroutineFn<number> {
  const align = bs.bl.pdiscard_alignment;
  const ra = bs.bl.request_alignment;
  if (bytes < ra) {
    check(
      !align || offset % align === 0 || (offset + bytes) % align === 0 || Math.ceil(offset / align) === Math.ceil((offset + bytes) / align),
      'small discard does not cross an alignment boundary',
    );
    return -ENOTSUP;
  }
  check(offset % ra === 0 && bytes % ra === 0, 'discard aligned to request_alignment');
  if (align && bytes >= align) check(offset % align === 0 && bytes % align === 0, 'discard aligned to pdiscard_alignment');
  if (bs.bl.max_pdiscard) check(bytes <= bs.bl.max_pdiscard, 'discard within max_pdiscard');
  const err = yield* rule_check(bs, offset, bytes, IO_DISCARD);
  if (err) return err;
  return yield* bdrv_co_pdiscard(bs.file, offset, bytes);
}

function* blkdebug_co_flush(bs: BlockDriverState): CoroutineFn<number> {
  const err = yield* rule_check(bs, 0, 0, IO_FLUSH);
  if (err) return err;
  return yield* bdrv_co_flush(bs.file!.bs);
}

function* blkdebug_co_block_status(
  bs: BlockDriverState,
  _want_zero: boolean,
  offset: number,
  bytes: number,
  out: BlockStatusOut,
): CoroutineFn<number> {
  check((offset | bytes) % bs.bl.request_alignment === 0, 'block status aligned');
  const err = yield* rule_check(bs, offset, bytes, IO_BLOCK_STATUS);
  if (err) return err;
  out.pnum = bytes;
  out.map = offset;
  out.file = bs.file!.bs;
  return BDRV_BLOCK_RAW | BDRV_BLOCK_OFFSET_VALID;
}

/** The blkdebug driver (QEMU: `bdrv_blkdebug`). */
export const bdrv_blkdebug: BlockDriver = {
  format_name: 'blkdebug',
  protocol_name: 'blkdebug',
  is_filter: true,
  bdrv_parse_filename: blkdebug_parse_filename,
  bdrv_file_open: blkdebug_open,
  bdrv_close: blkdebug_close,
  bdrv_getlength: blkdebug_getlength,
  bdrv_refresh_limits: blkdebug_refresh_limits,
  bdrv_co_preadv: blkdebug_co_preadv,
  bdrv_co_pwritev: blkdebug_co_pwritev,
  bdrv_co_pwrite_zeroes: blkdebug_co_pwrite_zeroes,
  bdrv_co_pdiscard: blkdebug_co_pdiscard,
  bdrv_co_flush_to_disk: blkdebug_co_flush,
  bdrv_co_block_status: blkdebug_co_block_status,
  bdrv_co_debug_event: blkdebug_co_debug_event,
  bdrv_debug_breakpoint: blkdebug_debug_breakpoint,
  bdrv_debug_remove_breakpoint: blkdebug_debug_remove_breakpoint,
  bdrv_debug_resume: blkdebug_debug_resume,
  bdrv_debug_is_suspended: blkdebug_debug_is_suspended,
};

/** Registers blkdebug unless a driver of that name already is. QEMU: `bdrv_blkdebug_init`. */
export function bdrv_blkdebug_init(): void {
  if (bdrv_find_format('blkdebug') === null) bdrv_register(bdrv_blkdebug);
}

/** The engine's current state number (test/inspection helper; QEMU keeps it internal). */
export function blkdebug_get_state(bs: BlockDriverState): number {
  return state_of(bs).state;
}
