/**
 * aioco's public API: everything users import. Names and argument orders follow
 * ../shared/API.md; QEMU's concepts keep QEMU's names.
 */

// Coroutines
export {
  Coroutine,
  CoroutineError,
  qemu_coroutine_create,
  qemu_coroutine_enter,
  qemu_aio_coroutine_enter,
  qemu_coroutine_enter_if_inactive,
  qemu_coroutine_yield,
  qemu_coroutine_self,
  qemu_in_coroutine,
  qemu_coroutine_entered,
  qemu_coroutine_backtrace,
} from './coroutine/coroutine.ts';
export type { CoroutineFn, CoroutineEntry, CoroutineYield } from './coroutine/coroutine.ts';
export {
  CoQueue,
  qemu_co_queue_init,
  qemu_co_queue_wait,
  qemu_co_queue_next,
  qemu_co_queue_restart_all,
  qemu_co_enter_next,
  qemu_co_queue_empty,
} from './coroutine/co-queue.ts';
export {
  CoMutex,
  qemu_co_mutex_init,
  qemu_co_mutex_lock,
  qemu_co_mutex_unlock,
  qemu_co_mutex_assert_locked,
} from './coroutine/co-mutex.ts';
export {
  CoRwlock,
  qemu_co_rwlock_init,
  qemu_co_rwlock_rdlock,
  qemu_co_rwlock_wrlock,
  qemu_co_rwlock_upgrade,
  qemu_co_rwlock_unlock,
  qemu_co_rwlock_downgrade,
} from './coroutine/co-rwlock.ts';
export {
  QemuCoSleep,
  qemu_co_sleep_ns,
  qemu_co_sleep_ns_wakeable,
  qemu_co_sleep,
  qemu_co_sleep_wake,
} from './aio/co-sleep.ts';

// AioContext, bottom halves, notifiers
export {
  AioContext,
  qemu_get_aio_context,
  qemu_get_current_aio_context,
  aio_context_new,
  aio_context_ref,
  aio_context_unref,
  aio_context_acquire,
  aio_context_release,
  aio_context_set_poll_params,
  aio_notify,
  aio_notify_accept,
} from './aio/aio-context.ts';
export {
  QEMUBH,
  aio_bh_new,
  aio_bh_schedule_oneshot,
  qemu_bh_schedule,
  qemu_bh_schedule_idle,
  qemu_bh_cancel,
  qemu_bh_delete,
  aio_bh_poll,
} from './aio/bh.ts';
export type { QEMUBHFunc } from './aio/bh.ts';
export { aio_poll, aio_prepare, aio_pending, aio_dispatch, aio_compute_timeout } from './aio/aio-poll.ts';
export { aio_get_g_source, qemu_init_main_loop } from './aio/g-source.ts';
export type { AioGSource } from './aio/g-source.ts';
export {
  EventNotifier,
  event_notifier_init,
  event_notifier_get_fd,
  event_notifier_set,
  event_notifier_test_and_clear,
  event_notifier_cleanup,
} from './aio/event-notifier.ts';
export {
  aio_set_event_notifier,
  aio_set_event_notifier_poll,
  aio_set_fd_handler,
  aio_set_fd_poll,
  aio_disable_external,
  aio_enable_external,
  aio_external_disabled,
  aio_node_check,
} from './aio/fd-handler.ts';
export type { IOHandler, AioPollFn } from './aio/fd-handler.ts';

// Timers and clocks
export {
  QEMU_CLOCK_REALTIME,
  QEMU_CLOCK_VIRTUAL,
  QEMU_CLOCK_HOST,
  QEMU_CLOCK_VIRTUAL_RT,
  SCALE_NS,
  SCALE_US,
  SCALE_MS,
  qemu_clock_get_ns,
  qemu_clock_get_us,
  qemu_clock_get_ms,
  qemu_clock_enable,
  qemu_clock_set_manual,
  qemu_clock_advance_virtual_time,
  qemu_soonest_timeout,
  qemu_timeout_ns_to_ms,
} from './aio/clock.ts';
export type { QEMUClockType } from './aio/clock.ts';
export {
  QEMU_TIMER_ATTR_EXTERNAL,
  QEMU_TIMER_ATTR_ALL,
  QEMUTimer,
  aio_timer_new,
  aio_timer_new_with_attrs,
  timer_mod,
  timer_mod_ns,
  timer_mod_anticipate,
  timer_mod_anticipate_ns,
  timer_del,
  timer_free,
  timer_pending,
  timer_expired,
  timer_expire_time_ns,
} from './aio/timer.ts';
export type { QEMUTimerCB } from './aio/timer.ts';

// Moving coroutines between contexts, waiting, IOThreads
export {
  aio_co_schedule,
  aio_co_wake,
  aio_co_enter,
  aio_co_reschedule_self,
  qemu_coroutine_get_aio_context,
} from './aio/co-schedule.ts';
export { AIO_WAIT_WHILE, aio_wait_kick, aio_wait_bh_oneshot } from './aio/aio-wait.ts';
export { IOThread, iothread_create, iothread_get_aio_context, iothread_destroy } from './aio/iothread.ts';
export type { IOThreadOptions } from './aio/iothread.ts';

// Bridges to promises and effection
export { coAwait, coRun, coroutineOperation, useAioContext, useIOThread } from './aio/bridge.ts';

// Errors
export { QemuError, AioWaitError, error_set_progname, error_get_progname, error_report, warn_report } from './aio/error.ts';
export * from './aio/errno.ts';

// Thread pool and AIOCBs
export { BlockAIOCB, qemu_aio_get, qemu_aio_ref, qemu_aio_unref, qemu_aio_count_live } from './aio/aiocb.ts';
export type { AIOCBInfo, BlockCompletionFunc } from './aio/aiocb.ts';
export {
  ThreadPool,
  ThreadPoolElement,
  aio_get_thread_pool,
  thread_pool_func,
  thread_pool_submit_aio,
  thread_pool_submit_co,
  thread_pool_submit,
  thread_pool_update_params,
  thread_pool_preadv,
  thread_pool_pwritev,
  thread_pool_fsync,
  thread_pool_fdatasync,
  thread_pool_ftruncate,
  thread_pool_fstat_size,
  thread_pool_write_zeroes,
  thread_pool_nop,
} from './aio/thread-pool.ts';
export type {
  ThreadPoolFunc,
  ThreadPoolRwArg,
  ThreadPoolFdArg,
  ThreadPoolTruncateArg,
  ThreadPoolZeroesArg,
} from './aio/thread-pool.ts';
export { qemu_memalign, qemu_vfree } from './aio/guest-memory.ts';
export { bdrv_aio_cancel, bdrv_aio_cancel_async } from './block/aiocb.ts';
export { qemu_blockalign } from './block/blockalign.ts';
export type { BlockAlignSource } from './block/blockalign.ts';
export {
  IOV_MAX,
  QEMUIOVector,
  QEMU_IOVEC_INIT_BUF,
  iov_size,
  iov_from_buf,
  iov_to_buf,
  iov_memset,
  iov_discard_front,
  iov_discard_back,
  qemu_iovec_init,
  qemu_iovec_init_external,
  qemu_iovec_init_buf,
  qemu_iovec_buf,
  qemu_iovec_init_extended,
  qemu_iovec_init_slice,
  qemu_iovec_slice,
  qemu_iovec_subvec_niov,
  qemu_iovec_add,
  qemu_iovec_concat,
  qemu_iovec_concat_iov,
  qemu_iovec_is_zero,
  qemu_iovec_destroy,
  qemu_iovec_reset,
  qemu_iovec_to_buf,
  qemu_iovec_from_buf,
  qemu_iovec_memset,
  qemu_iovec_compare,
  qemu_iovec_clone,
  qemu_iovec_discard_back,
  qemu_iovec_is_shared,
} from './block/qiov.ts';
export type { QEMUIOVectorSlice, IOVCursor } from './block/qiov.ts';

// Block layer core (QEMU 7.2 block.c, block/io.c, block/block-backend.c)
export * from './block/block-common.ts';
export { bdrv_register, bdrv_unregister, bdrv_find_format, bdrv_find_protocol, bdrv_drivers, path_has_protocol } from './block/block-driver.ts';
export type { BlockDriver, BlockStatusOut, QemuOptDesc, BdrvCheckResult, BlockDriverInfo, ImageInfoSpecific, QEMUSnapshotInfo } from './block/block-driver.ts';
export {
  BDRV_CHILD_DATA,
  BDRV_CHILD_METADATA,
  BDRV_CHILD_FILTERED,
  BDRV_CHILD_COW,
  BDRV_CHILD_PRIMARY,
  BDRV_CHILD_IMAGE,
  BdrvChild,
  BlockDriverState,
  bdrv_find_node,
  bdrv_get_aio_context,
  bdrv_is_read_only,
  bdrv_is_inserted,
  bdrv_ref,
  bdrv_unref,
  bdrv_attach_child,
  bdrv_unref_child,
  bdrv_getlength,
  bdrv_refresh_limits,
  bdrv_open,
  bdrv_open_child,
  bdrv_open_file_child,
  bdrv_primary_child,
  bdrv_primary_bs,
  bdrv_all_states,
  raw_probe_warning,
  refresh_total_sectors,
} from './block/block-driver-state.ts';
export type { BdrvChildClass } from './block/block-driver-state.ts';
export { BdrvTrackedRequest } from './block/tracked-request.ts';
export {
  bdrv_inc_in_flight,
  bdrv_dec_in_flight,
  bdrv_drain_poll,
  bdrv_drained_begin,
  bdrv_drained_end,
  bdrv_drain,
  bdrv_drain_all_begin,
  bdrv_drain_all_end,
  bdrv_drain_all,
  bdrv_try_change_aio_context,
  bdrv_set_aio_context,
} from './block/drain.ts';
export {
  bdrv_check_request,
  bdrv_check_request32,
  bdrv_debug_event,
  bdrv_co_debug_event,
  bdrv_debug_breakpoint,
  bdrv_debug_remove_breakpoint,
  bdrv_debug_resume,
  bdrv_debug_is_suspended,
  bdrv_co_preadv_part,
  bdrv_co_preadv,
  bdrv_co_pread,
  bdrv_co_pwritev_part,
  bdrv_co_pwritev,
  bdrv_co_pwrite,
  bdrv_co_pwrite_zeroes,
  bdrv_co_flush,
  bdrv_co_pdiscard,
  bdrv_co_truncate,
} from './block/io.ts';
export { bdrv_co_block_status, bdrv_co_block_status_above, bdrv_co_is_allocated } from './block/block-status.ts';
export {
  BlockBackend,
  BlkAioEmAIOCB,
  blk_new_open,
  blk_insert_bs,
  blk_bs,
  blk_unref,
  blk_get_aio_context,
  blk_set_enable_write_cache,
  blk_getlength,
  blk_check_byte_request,
  blk_co_preadv,
  blk_co_preadv_part,
  blk_co_pwritev,
  blk_co_pwritev_part,
  blk_co_pwrite_zeroes,
  blk_co_pdiscard,
  blk_co_flush,
  blk_aio_preadv,
  blk_aio_pwritev,
  blk_aio_pwrite_zeroes,
  blk_aio_flush,
  blk_aio_pdiscard,
  blk_pread,
  blk_pwrite,
  blk_pwrite_zeroes,
  blk_flush,
  blk_pdiscard,
  blk_drain,
  blk_is_writable,
} from './block/block-backend.ts';
export { guestMemoryProbePhase } from './aio/guest-memory.ts';
export { thread_pool_aiocb_info } from './aio/thread-pool.ts';
export {
  AioTaskPool,
  aio_task_pool_new,
  aio_task_pool_start_task,
  aio_task_pool_wait_one,
  aio_task_pool_wait_slot,
  aio_task_pool_wait_all,
  aio_task_pool_free,
  aio_task_pool_status,
  aio_task_pool_empty,
} from './block/aio-task.ts';
export type { AioTask, AioTaskFunc } from './block/aio-task.ts';
export {
  qemu_strtosz,
  qemu_opt_get_size,
  QemuOpts,
  qemu_opts_create,
  qemu_opts_append,
  qemu_opt_set,
  qemu_opt_set_number,
  qemu_opt_set_bool,
  qemu_opt_find,
  qemu_opt_get,
  qemu_opt_get_del,
  qemu_opt_unset,
  qemu_opt_get_size_del,
  qemu_opt_get_number_del,
  qemu_opt_get_bool_del,
  qemu_opt_get_bool,
  qemu_opt_get_number,
  qemu_opts_do_parse,
  qemu_opts_print,
} from './block/qemu-opts.ts';
export type { QemuOptsList, QemuOpt } from './block/qemu-opts.ts';
export { bdrv_poll_co, bdrv_pread, bdrv_pwrite, bdrv_pwrite_sync, bdrv_co_pwrite_sync, bdrv_pwrite_zeroes, bdrv_flush } from './block/co-wrapper.ts';
export { path_combine, bdrv_dirname, bdrv_get_full_backing_filename, bdrv_open_backing_file } from './block/backing.ts';
export { bdrv_co_create, bdrv_create, bdrv_co_create_file } from './block/create.ts';
export { bdrv_co_check, bdrv_check, bdrv_check_result_new } from './block/check.ts';
export {
  bdrv_get_info,
  bdrv_get_specific_info,
  bdrv_get_allocated_file_size,
  bdrv_image_info_specific_dump,
  bdrv_snapshot_list,
  block_driver_info_new,
} from './block/block-info.ts';
