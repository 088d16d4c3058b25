/// Runs `body` in a task of its own, which the caller's cancellation does not reach, and waits for
/// it. For clean-up on the way out of a cancelled operation (Ctrl-C during `clone`): stopping a QEMU
/// waits for it to exit, and a wait that a cancellation cut short would leave it running.
package func uncancellable<T: Sendable>(_ body: @escaping @Sendable () async -> T) async -> T {
    await Task { await body() }.value
}
