import Foundation
import Logging
import VMTemplateKit
import VMTemplateOS
import VMTemplateStore

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// `vmtemplate serve`: one process per store that answers the runtime API, keeps the warm pools
/// filled, runs the scheduler and writes the metrics file, until the API ends (SIGTERM, SIGINT).
package struct StoreServer: Sendable {
    package struct Configuration: Sendable {
        /// The API's Unix socket.
        package var socketPath: String
        /// A group whose members may use the API too.
        package var socketGroup: gid_t?
        /// Seconds between the scheduler's rounds (nil: the store's setting).
        package var schedulerInterval: Double?
        /// Between two pool members being filled.
        package var fillPause: Duration = .milliseconds(100)
        /// Where the metrics are also written, atomically, every `metricsInterval`.
        package var metricsFile: String?
        package var metricsInterval: Duration = .seconds(15)
        /// `--qemu`, for pool members.
        package var explicitQEMU: String?
        /// Per-clone metric series (``APIMetrics/perClone``).
        package var perCloneMetrics = false
        /// How long an exited clone is kept before it is removed (nil: until somebody removes it).
        package var exitedRetention: Duration? = CloneWatcher.defaultRetention

        package init(socketPath: String) {
            self.socketPath = socketPath
        }
    }

    package let store: TemplateStore
    package let configuration: Configuration

    package init(store: TemplateStore, configuration: Configuration) {
        self.store = store
        self.configuration = configuration
    }

    /// Serves until the API ends; the pool keeper, the scheduler and the metrics writer end with
    /// it. Every line goes through `logger` (``ServeLogHandler``: one format for all of them).
    package func run(logger: Logger) async throws {
        let log: @Sendable (String) -> Void = { logger.info("\($0)") }
        // One server per store, whatever its socket: two would fill pools twice and answer for
        // the same clones. Held until this process exits.
        let lock = try store.openLockFile("\(store.root)/serve.lock")
        guard lock.tryExclusive() else {
            let holder = lock.holders().first.map { " (process \($0.pid), \(TerminalText.escape($0.command)))" } ?? ""
            throw VMTemplateError(.busy, "another vmtemplate serve\(holder) already runs for store '\(store.root)': run one per store.")
        }
        defer { lock.unlock() }
        let engine = CloneEngine(store: store, explicitQEMU: configuration.explicitQEMU)
        let server = APIServer(engine: engine, socketPath: configuration.socketPath, socketGroup: configuration.socketGroup, metrics: APIMetrics(perClone: configuration.perCloneMetrics))
        let keeper = PoolKeeper(pool: engine.pool, fillPause: configuration.fillPause)
        let scheduler = Scheduler(store: store)
        let watcher = CloneWatcher(store: store, retention: configuration.exitedRetention)
        let interval = configuration.schedulerInterval
        let metrics = server.metrics
        let store = self.store
        if let metricsFile = configuration.metricsFile {
            // Written once before serving, so a bad path fails the start, not the first round.
            try await metrics.write(to: metricsFile, store: store)
        }
        let metricsFile = configuration.metricsFile
        let metricsInterval = configuration.metricsInterval
        try await withThrowingTaskGroup(of: Void.self) { tasks in
            tasks.addTask { await keeper.run(log: log) }
            tasks.addTask { await watcher.run(log: log) }
            tasks.addTask {
                // Only its start can fail (another scheduler holds the store, the settings are
                // broken): said once, and tried again every 5 s, so limits are enforced again as
                // soon as they can be.
                var said: String?
                while !Task.isCancelled {
                    do {
                        try await scheduler.run(interval: interval, log: log, onEnforcement: { metrics.recordEnforcement($0) })
                    } catch {
                        let failure = VMTemplateError.oneLine(error)
                        if failure != said { log("scheduler not running: \(failure) Trying again every 5 s.") }
                        said = failure
                    }
                    try? await Task.sleep(for: .seconds(5))
                }
            }
            if let metricsFile {
                tasks.addTask {
                    while !Task.isCancelled {
                        try? await Task.sleep(for: metricsInterval)
                        do { try await metrics.write(to: metricsFile, store: store) } catch { log("metrics: \(VMTemplateError.oneLine(error))") }
                    }
                }
            }
            try await server.run(logger: logger, onListening: {
                log("vmtemplate serve: store \(store.root), API on \(server.socketPath)")
                // Type=notify: systemd starts what depends on the server once it accepts.
                ServiceNotification.ready(status: "API on \(server.socketPath)", environment: ProcessInfo.processInfo.environment)
            })
            tasks.cancelAll()
        }
    }
}
