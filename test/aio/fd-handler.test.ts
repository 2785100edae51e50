// fd handlers (src/aio/fd-handler.ts): aio_set_fd_handler, removal and replacement during
// dispatch, external clients; QEMU's /aio/external-client intent plus rules S28-S33.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import {
  EventNotifier,
  QemuError,
  aio_context_new,
  aio_context_set_poll_params,
  aio_disable_external,
  aio_dispatch,
  aio_enable_external,
  aio_external_disabled,
  aio_node_check,
  aio_notify_accept,
  aio_poll,
  aio_set_event_notifier,
  aio_set_event_notifier_poll,
  aio_set_fd_handler,
  aio_set_fd_poll,
  event_notifier_cleanup,
  event_notifier_get_fd,
  event_notifier_set,
  event_notifier_test_and_clear,
} from '../../src/index.ts';
import { assertNotNotified, throwsExactly } from '../helpers/assert.ts';
import { drain } from '../helpers/aio.ts';

test('S28 aio_set_fd_handler refuses an fd that is not an aioco notifier or channel', () => {
  const ctx = aio_context_new();
  for (const fd of [5, 0, -1, 2 ** 30 + 10_000_000]) {
    throwsExactly(
      () => aio_set_fd_handler(ctx, fd, false, () => {}, null, null, null),
      QemuError,
      `aio_set_fd_handler: fd ${fd} is not an aioco notifier or channel`,
    );
  }
  throwsExactly(
    () => aio_set_fd_handler(ctx, 7, false, null, () => {}, null, null),
    QemuError,
    'aio_set_fd_handler: fd 7 is not an aioco notifier or channel',
  );
  // Removing a handler that does not exist is a silent no-op, without a notification.
  aio_set_fd_handler(ctx, 5, false, null, null, null, null);
  assertNotNotified(ctx);
});

test('S28 io_read gets the opaque while the notifier is set; io_write is always ready', () => {
  const ctx = aio_context_new();
  const e = new EventNotifier();
  const fd = event_notifier_get_fd(e);
  const calls: string[] = [];
  const opaque = { tag: 'op' };
  aio_set_fd_handler(
    ctx,
    fd,
    false,
    (o: typeof opaque) => {
      calls.push(`read:${o.tag}:${event_notifier_test_and_clear(e)}`);
    },
    null,
    null,
    opaque,
  );
  assert.is(aio_poll(ctx, false), false);
  event_notifier_set(e);
  assert.is(aio_poll(ctx, false), true);
  assert.equal(calls, ['read:op:true']);

  // Add write interest: ready on every poll; read first when both are ready.
  aio_set_fd_handler(
    ctx,
    fd,
    false,
    (o: typeof opaque) => {
      calls.push(`read:${o.tag}:${event_notifier_test_and_clear(e)}`);
    },
    (o: typeof opaque) => {
      calls.push(`write:${o.tag}`);
    },
    null,
    opaque,
  );
  calls.length = 0;
  assert.is(aio_poll(ctx, false), true);
  assert.is(aio_poll(ctx, false), true);
  event_notifier_set(e);
  assert.is(aio_poll(ctx, false), true);
  assert.equal(calls, ['write:op', 'write:op', 'read:op:true', 'write:op']);

  // A write-only handler never calls a read callback, set or not.
  calls.length = 0;
  aio_set_fd_handler(ctx, fd, false, null, (o: typeof opaque) => calls.push(`w:${o.tag}`), null, opaque);
  event_notifier_set(e);
  assert.is(aio_poll(ctx, false), true);
  assert.equal(calls, ['w:op']);
  assert.is(event_notifier_test_and_clear(e), true);

  aio_set_fd_handler(ctx, fd, false, null, null, null, null);
  assert.is(aio_poll(ctx, false), false);
  assert.equal(calls, ['w:op']);
});

test('S22/S28 adding, modifying and removing a handler each notify', () => {
  const ctx = aio_context_new();
  const e = new EventNotifier();
  const read = (x: EventNotifier) => event_notifier_test_and_clear(x);
  aio_set_event_notifier(ctx, e, false, read, null);
  assert.is(aio_poll(ctx, true), false); // woken by the add
  assertNotNotified(ctx);
  aio_set_event_notifier(ctx, e, false, read, () => false);
  assert.is(aio_poll(ctx, true), false); // by the modification
  assertNotNotified(ctx);
  aio_set_event_notifier(ctx, e, false, null, null);
  assert.is(aio_poll(ctx, true), false); // by the removal
  assertNotNotified(ctx);
  aio_set_event_notifier(ctx, e, false, null, null); // removing again: unknown, silent
  assertNotNotified(ctx);
});

test('S28 replacing a handler: only the newest callback runs', () => {
  const ctx = aio_context_new();
  const e = new EventNotifier();
  const calls: string[] = [];
  aio_set_event_notifier(ctx, e, false, () => calls.push('old'), null);
  aio_set_event_notifier(ctx, e, false, (x: EventNotifier) => {
    event_notifier_test_and_clear(x);
    calls.push('new');
  }, null);
  event_notifier_set(e);
  assert.is(aio_poll(ctx, false), true);
  assert.equal(calls, ['new']);
  aio_set_event_notifier(ctx, e, false, null, null);
  event_notifier_set(e);
  assert.is(aio_poll(ctx, false), false);
  assert.equal(calls, ['new']);
});

test('S29 a handler removed by an earlier callback of the same round is not called', () => {
  const ctx = aio_context_new();
  const e1 = new EventNotifier();
  const e2 = new EventNotifier();
  const calls: string[] = [];
  // Each removes the other; whichever runs first (S32: order unspecified) wins alone.
  aio_set_event_notifier(ctx, e1, false, (x: EventNotifier) => {
    event_notifier_test_and_clear(x);
    calls.push('h1');
    aio_set_event_notifier(ctx, e2, false, null, null);
  }, null);
  aio_set_event_notifier(ctx, e2, false, (x: EventNotifier) => {
    event_notifier_test_and_clear(x);
    calls.push('h2');
    aio_set_event_notifier(ctx, e1, false, null, null);
  }, null);
  event_notifier_set(e1);
  event_notifier_set(e2);
  assert.is(aio_poll(ctx, false), true);
  assert.ok(calls.length === 1 && (calls[0] === 'h1' || calls[0] === 'h2'), calls.join());
  // The loser's notifier is still set, but nobody watches it any more.
  assert.is(aio_poll(ctx, false), false);
  assert.is(calls.length, 1);
  const survivor = calls[0] === 'h1' ? e1 : e2;
  aio_set_event_notifier(ctx, survivor, false, null, null);
  assert.is(aio_poll(ctx, false), false);
});

test('S29 a handler replaced during dispatch: neither old nor new runs this round; the new one runs next', () => {
  const ctx = aio_context_new();
  const e1 = new EventNotifier();
  const e2 = new EventNotifier();
  const calls: string[] = [];
  const fresh = (name: string) => (x: EventNotifier) => {
    event_notifier_test_and_clear(x);
    calls.push(name);
  };
  aio_set_event_notifier(ctx, e1, false, (x: EventNotifier) => {
    event_notifier_test_and_clear(x);
    calls.push('h1_old');
    aio_set_event_notifier(ctx, e2, false, fresh('h2_new'), null);
  }, null);
  aio_set_event_notifier(ctx, e2, false, (x: EventNotifier) => {
    event_notifier_test_and_clear(x);
    calls.push('h2_old');
    aio_set_event_notifier(ctx, e1, false, fresh('h1_new'), null);
  }, null);
  event_notifier_set(e1);
  event_notifier_set(e2);
  assert.is(aio_poll(ctx, false), true);
  assert.is(calls.length, 1, calls.join());
  assert.is(aio_poll(ctx, false), true);
  assert.ok(
    (calls[0] === 'h1_old' && calls[1] === 'h2_new') || (calls[0] === 'h2_old' && calls[1] === 'h1_new'),
    calls.join(),
  );
  assert.is(calls.length, 2);
  assert.is(aio_poll(ctx, false), false);
  aio_set_event_notifier(ctx, e1, false, null, null);
  aio_set_event_notifier(ctx, e2, false, null, null);
});

test('S29 io_read removing its own handler stops io_write of the same dispatch', () => {
  const ctx = aio_context_new();
  const e = new EventNotifier(true);
  const fd = event_notifier_get_fd(e);
  const calls: string[] = [];
  aio_set_fd_handler(
    ctx,
    fd,
    false,
    () => {
      calls.push('read');
      aio_set_fd_handler(ctx, fd, false, null, null, null, null);
    },
    () => calls.push('write'),
    null,
    null,
  );
  assert.is(aio_poll(ctx, false), true);
  assert.equal(calls, ['read']);
  assert.is(aio_poll(ctx, false), false);
  // The same through aio_dispatch's full scan.
  aio_set_fd_handler(
    ctx,
    fd,
    false,
    () => {
      calls.push('read2');
      aio_set_fd_handler(ctx, fd, false, null, null, null, null);
    },
    () => calls.push('write2'),
    null,
    null,
  );
  aio_dispatch(ctx);
  assert.equal(calls, ['read', 'read2']);
  assert.is(aio_poll(ctx, false), false);
});

test('S29 a handler that removes and re-adds itself during dispatch runs once per poll', () => {
  const ctx = aio_context_new();
  const e = new EventNotifier();
  const calls: string[] = [];
  function again(): void {
    calls.push('again');
  }
  aio_set_event_notifier(ctx, e, false, () => {
    calls.push('first');
    aio_set_event_notifier(ctx, e, false, null, null);
    aio_set_event_notifier(ctx, e, false, again, null); // does not clear: level-triggered
  }, null);
  event_notifier_set(e);
  assert.is(aio_poll(ctx, false), true);
  assert.equal(calls, ['first']);
  assert.is(aio_poll(ctx, false), true);
  assert.is(aio_poll(ctx, false), true);
  assert.equal(calls, ['first', 'again', 'again']);
  aio_set_event_notifier(ctx, e, false, null, null);
  assert.is(aio_poll(ctx, false), false);
});

test('S29/S102 aio_dispatch also skips a handler removed earlier in its scan', () => {
  const ctx = aio_context_new();
  const e1 = new EventNotifier(true);
  const e2 = new EventNotifier(true);
  const calls: string[] = [];
  aio_set_event_notifier(ctx, e1, false, (x: EventNotifier) => {
    event_notifier_test_and_clear(x);
    calls.push('h1');
    aio_set_event_notifier(ctx, e2, false, null, null);
  }, null);
  aio_set_event_notifier(ctx, e2, false, (x: EventNotifier) => {
    event_notifier_test_and_clear(x);
    calls.push('h2');
    aio_set_event_notifier(ctx, e1, false, null, null);
  }, null);
  aio_dispatch(ctx);
  assert.ok(calls.length === 1 && (calls[0] === 'h1' || calls[0] === 'h2'), calls.join());
  aio_dispatch(ctx);
  assert.is(calls.length, 1);
  aio_set_event_notifier(ctx, calls[0] === 'h1' ? e1 : e2, false, null, null);
  drain(ctx);
});

// ---------------------------------------------------------------- external clients (S33)

interface EData {
  n: number;
  active: number;
}
function auto_set_ready_cb(this: EData, e: EventNotifier): void {
  assert.is(event_notifier_test_and_clear(e), true);
  this.n++;
  if (this.active > 0) this.active--;
  if (this.active) event_notifier_set(e);
}

test('S33 /aio/external-client: disabled handlers are not dispatched; events stay pending until enable', () => {
  const ctx = aio_context_new();
  for (let i = 1; i < 3; i++) {
    const d: EData = { n: 0, active: 10 };
    const e = new EventNotifier();
    aio_set_event_notifier(ctx, e, true, auto_set_ready_cb.bind(d), null);
    event_notifier_set(e);
    for (let j = 0; j < i; j++) aio_disable_external(ctx);
    for (let j = 0; j < i; j++) {
      assert.is(aio_poll(ctx, false), false);
      assert.is(d.n, 0);
      assert.is(event_notifier_test_and_clear(e), true); // still pending
      event_notifier_set(e);
      aio_enable_external(ctx);
    }
    assert.is(aio_poll(ctx, false), true);
    assert.is(d.n, 1);
    aio_set_event_notifier(ctx, e, true, null, null);
    event_notifier_cleanup(e);
  }
  drain(ctx);
});

test('S33 aio_external_disabled and aio_node_check follow the disable count', () => {
  const ctx = aio_context_new();
  assert.is(aio_external_disabled(ctx), false);
  assert.equal([aio_node_check(ctx, true), aio_node_check(ctx, false)], [true, true]);
  aio_disable_external(ctx);
  aio_disable_external(ctx);
  assert.is(aio_external_disabled(ctx), true);
  assert.equal([aio_node_check(ctx, true), aio_node_check(ctx, false)], [false, true]);
  aio_enable_external(ctx);
  assert.is(aio_external_disabled(ctx), true);
  aio_enable_external(ctx);
  assert.is(aio_external_disabled(ctx), false);
  assert.equal([aio_node_check(ctx, true), aio_node_check(ctx, false)], [true, true]);
});

test('S33 non-external handlers keep running while external clients are disabled', () => {
  const ctx = aio_context_new();
  const ext = new EventNotifier(true);
  const internal = new EventNotifier(true);
  const calls: string[] = [];
  aio_set_event_notifier(ctx, ext, true, (x: EventNotifier) => {
    event_notifier_test_and_clear(x);
    calls.push('ext');
  }, null);
  aio_set_event_notifier(ctx, internal, false, (x: EventNotifier) => {
    event_notifier_test_and_clear(x);
    calls.push('internal');
  }, null);
  aio_disable_external(ctx);
  assert.is(aio_poll(ctx, false), true);
  assert.equal(calls, ['internal']);
  aio_dispatch(ctx); // the GSource path checks too
  assert.equal(calls, ['internal']);
  aio_enable_external(ctx);
  assert.is(aio_poll(ctx, false), true);
  assert.equal(calls, ['internal', 'ext']);
  aio_set_event_notifier(ctx, ext, true, null, null);
  aio_set_event_notifier(ctx, internal, false, null, null);
  drain(ctx);
});

test('S33 aio_enable_external without a matching disable throws', () => {
  const ctx = aio_context_new();
  throwsExactly(() => aio_enable_external(ctx), QemuError, "aio_enable_external: Assertion 'old > 0' failed");
  aio_disable_external(ctx);
  aio_enable_external(ctx);
  throwsExactly(() => aio_enable_external(ctx), QemuError, "aio_enable_external: Assertion 'old > 0' failed");
  assert.is(aio_external_disabled(ctx), false);
});

test('S22/S33 only the enable that brings the count to 0 notifies; disable never does', () => {
  const ctx = aio_context_new();
  aio_disable_external(ctx);
  aio_disable_external(ctx);
  assertNotNotified(ctx);
  aio_enable_external(ctx);
  assertNotNotified(ctx);
  aio_enable_external(ctx);
  assert.is(aio_poll(ctx, true), false); // woken by the notification
  assertNotNotified(ctx);
});

// ---------------------------------------------------------------- io_poll_begin/end setters (S31)

test('S31 aio_set_event_notifier_poll and aio_set_fd_poll on an unknown handler do nothing', () => {
  const ctx = aio_context_new();
  aio_context_set_poll_params(ctx, 1_000_000_000, 0, 0);
  aio_notify_accept(ctx);
  const e = new EventNotifier();
  const calls: string[] = [];
  aio_set_event_notifier_poll(ctx, e, () => calls.push('begin'), () => calls.push('end'));
  aio_set_fd_poll(ctx, event_notifier_get_fd(e), () => calls.push('begin'), () => calls.push('end'));
  aio_set_fd_poll(ctx, 12345, () => calls.push('begin'), () => calls.push('end')); // not even an fd
  assertNotNotified(ctx);

  // Registered afterwards, the handler has no io_poll_begin/io_poll_end.
  aio_set_event_notifier(
    ctx,
    e,
    false,
    (x: EventNotifier) => {
      calls.push(`read:${event_notifier_test_and_clear(x)}`);
    },
    (x: EventNotifier) => {
      const r = event_notifier_test_and_clear(x);
      calls.push(`poll:${r}`);
      return r;
    },
  );
  assert.is(aio_poll(ctx, false), false);
  event_notifier_set(e);
  assert.is(aio_poll(ctx, true), true);
  event_notifier_set(e);
  assert.is(aio_poll(ctx, true), true);
  assert.is(aio_poll(ctx, false), false);
  assert.equal(calls, ['read:true', 'poll:true', 'poll:false']);

  // aio_set_fd_poll on the registered fd does set them.
  calls.length = 0;
  aio_set_fd_poll(ctx, event_notifier_get_fd(e), () => calls.push('begin'), () => calls.push('end'));
  event_notifier_set(e);
  assert.is(aio_poll(ctx, true), true);
  assert.is(aio_poll(ctx, false), false);
  assert.equal(calls, ['begin', 'poll:true', 'end', 'poll:false']);
  aio_set_event_notifier(ctx, e, false, null, null);
  drain(ctx);
});

test.run();
