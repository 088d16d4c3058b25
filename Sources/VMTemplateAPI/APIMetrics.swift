import Foundation
import Synchronization
import VMTemplateKit
import VMTemplateOS
import VMTemplateQEMU
import VMTemplateStore

/// What `vmtemplate serve` counts, rendered in Prometheus' text format (0.0.4) for `GET /metrics`
/// and for `--metrics-file` (node_exporter's textfile collector).
///
/// Written here rather than with a client library: three counters, one histogram and gauges read
/// from the store at render time make ~150 lines, and a library would add a dependency (and its
/// own registry and locking) for no gain. Names follow Prometheus' conventions: the `vmtemplate_`
/// prefix, base units (`_seconds`, `_bytes`), `_total` on counters. docs/api.md lists them.
package final class APIMetrics: Sendable {
    /// Upper bounds of the latency buckets, in seconds: a hand-out takes a few ms, a fresh clone
    /// ~50 ms, a clone under load up to seconds.
    static let latencyBuckets: [Double] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10]

    struct Histogram {
        var counts = [Int](repeating: 0, count: APIMetrics.latencyBuckets.count)
        var sum = 0.0
        var count = 0

        mutating func observe(_ value: Double) {
            for (index, bound) in APIMetrics.latencyBuckets.enumerated() where value <= bound { counts[index] += 1 }
            sum += value
            count += 1
        }
    }

    struct Counters {
        /// By source: `pool` (a hand-out) or `fresh`.
        var cloneSeconds: [String: Histogram] = ["pool": Histogram(), "fresh": Histogram()]
        var requests: [Int: Int] = [:]
        /// API creates by template that a pool member served, and that found the pool empty.
        var handOuts: [String: Int] = [:]
        var poolMisses: [String: Int] = [:]
        // Every series there from the start, at 0: a rate over a counter that appears only with
        // its first event misses that event.
        var errors: [String: Int] = Dictionary(uniqueKeysWithValues: VMTemplateError.Code.allCases.map { ($0.rawValue, 0) })
        var enforcements: [EnforcementKey: Int] = Dictionary(uniqueKeysWithValues: OverLimitAction.allCases.flatMap { action in
            ["done", "failed", "escalated"].map { (EnforcementKey(action: action.rawValue, outcome: $0), 0) }
        })
    }

    struct EnforcementKey: Hashable, Comparable {
        var action: String
        var outcome: String

        static func < (a: Self, b: Self) -> Bool { (a.action, a.outcome) < (b.action, b.outcome) }
    }

    private let counters = Mutex(Counters())
    private let cache = RenderCache()

    /// How long a rendering is served again: a scrape reads every record and every live clone's
    /// smaps (~1 ms a clone), so scrapes closer than this (a scraper every second, a caller in a
    /// loop) share one, and never delay the scheduler's rounds.
    static let maxAge: Duration = .seconds(5)

    /// Whether each live clone has series of its own (`clone`, `name` labels): off by default,
    /// since clones come and go and every one would leave a series behind in Prometheus; the
    /// per-template sums are always there.
    let perClone: Bool

    package init(perClone: Bool = false) {
        self.perClone = perClone
    }

    func recordClone(fromPool: Bool, seconds: Double) {
        counters.withLock { $0.cloneSeconds[fromPool ? "pool" : "fresh", default: Histogram()].observe(seconds) }
    }

    /// A create through the API for `template`: served by a pool member, or restored fresh while
    /// the template has a pool (a miss: the pool was empty).
    func recordCreate(template: String, fromPool: Bool, hasPool: Bool) {
        counters.withLock { counters in
            if fromPool {
                counters.handOuts[template, default: 0] += 1
            } else if hasPool {
                counters.poolMisses[template, default: 0] += 1
            }
        }
    }

    func recordRequest(status: Int) {
        counters.withLock { $0.requests[status, default: 0] += 1 }
    }

    func recordError(_ code: VMTemplateError.Code) {
        counters.withLock { $0.errors[code.rawValue, default: 0] += 1 }
    }

    package func recordEnforcement(_ enforcement: Enforcement) {
        // A kill that replaced failed pauses is counted apart: it says a limit nearly failed open.
        let outcome = !enforcement.done ? "failed" : enforcement.escalated == true ? "escalated" : "done"
        let key = EnforcementKey(action: enforcement.action.rawValue, outcome: outcome)
        counters.withLock { $0.enforcements[key, default: 0] += 1 }
    }

    /// The text, rendered at most ``maxAge`` ago, on a thread of its own; concurrent callers wait
    /// for the one rendering under way.
    package func text(store: TemplateStore) async -> String {
        await cache.text(maxAge: Self.maxAge) { [self] in
            (try? await onOwnThread { self.render(store: store) }) ?? ""
        }
    }

    /// The text for the store as it is now: clone gauges from the records (and each live clone's
    /// smaps), pool gauges, and the counters of this process.
    package func render(store: TemplateStore) -> String {
        let records = store.clones().records
        return render(records: records, pools: WarmPool(store: store).status(records: records), measure: { record in
            guard let pid = record.qemu?.pid, record.qemu?.isAlive == true else { return nil }
            return try? CloneMemoryUsage.measure(pid: pid, templateFile: record.memoryFile)
        })
    }

    func render(records: [CloneRecord], pools: [WarmPool.Status], measure: (CloneRecord) -> CloneMemoryUsage?) -> String {
        let snapshot = counters.withLock { $0 }
        var text = TextFormat()

        text.metric("vmtemplate_build_info", "gauge", "This server's vmtemplate version (always 1).", [(Labels([("version", VMTemplateVersion.current)]), "1")])
        var byState: [Labels: Int] = [:]
        var cow: [(Labels, String)] = []
        var qemuPrivate: [(Labels, String)] = []
        var cowByTemplate: [String: UInt64] = [:]
        var privateByTemplate: [String: UInt64] = [:]
        for record in records {
            let live = record.isLive
            let state = live ? record.state.rawValue : CloneState.exited.rawValue
            byState[Labels([("template", record.template), ("state", state)]), default: 0] += 1
            guard live, let usage = measure(record) else { continue }
            cowByTemplate[record.template, default: 0] &+= usage.copyOnWriteBytes
            privateByTemplate[record.template, default: 0] &+= usage.qemuPrivateBytes
            guard perClone else { continue }
            let labels = Labels([("clone", record.id), ("name", record.name), ("template", record.template)])
            cow.append((labels, String(usage.copyOnWriteBytes)))
            qemuPrivate.append((labels, String(usage.qemuPrivateBytes)))
        }
        text.metric("vmtemplate_clones", "gauge", "Clones by template and state (exited: the QEMU is gone, the record is left).",
                    byState.sorted { $0.key.text < $1.key.text }.map { ($0.key, String($0.value)) })
        text.metric("vmtemplate_cow_bytes", "gauge", "Guest RAM the live clones of a template have written: their copy-on-write pages.",
                    cowByTemplate.sorted { $0.key < $1.key }.map { (Labels([("template", $0.key)]), String($0.value)) })
        text.metric("vmtemplate_qemu_private_bytes", "gauge", "The live clones' QEMUs' own anonymous memory, outside guest RAM, by template.",
                    privateByTemplate.sorted { $0.key < $1.key }.map { (Labels([("template", $0.key)]), String($0.value)) })
        if perClone {
            text.metric("vmtemplate_clone_cow_bytes", "gauge", "Guest RAM a live clone has written: its copy-on-write pages.", cow)
            text.metric("vmtemplate_clone_qemu_private_bytes", "gauge", "A live clone's QEMU's own anonymous memory, outside guest RAM.", qemuPrivate)
        }

        let byTemplate = { (value: (WarmPool.Status) -> Int) in pools.map { (Labels([("template", $0.template)]), String(value($0))) } }
        text.metric("vmtemplate_pool_size", "gauge", "Members each warm pool should hold.", byTemplate(\.size))
        text.metric("vmtemplate_pool_ready", "gauge", "Members ready to be handed out.", byTemplate(\.ready))
        text.metric("vmtemplate_pool_filling", "gauge", "Members being restored and warmed.", byTemplate(\.filling))
        // Every pool's series from 0, and those of templates that had one since.
        let pooled = Set(pools.map(\.template)).union(snapshot.handOuts.keys).union(snapshot.poolMisses.keys).sorted()
        text.metric("vmtemplate_pool_handouts_total", "counter", "API creates a warm pool member served, by template.",
                    pooled.map { (Labels([("template", $0)]), String(snapshot.handOuts[$0] ?? 0)) })
        text.metric("vmtemplate_pool_misses_total", "counter", "API creates of a template with a pool that found it empty and were restored fresh.",
                    pooled.map { (Labels([("template", $0)]), String(snapshot.poolMisses[$0] ?? 0)) })

        text.histogram("vmtemplate_clone_duration_seconds", "Time from a clone request through the API to the clone running, by source (pool: a hand-out; fresh: a restore).",
                       snapshot.cloneSeconds.sorted { $0.key < $1.key }.map { (Labels([("source", $0.key)]), $0.value) })
        text.metric("vmtemplate_enforcements_total", "counter", "Scheduler actions on clones over their copy-on-write limit, by action and outcome.",
                    snapshot.enforcements.sorted { $0.key < $1.key }.map { (Labels([("action", $0.key.action), ("outcome", $0.key.outcome)]), String($0.value)) })
        text.metric("vmtemplate_api_requests_total", "counter", "API requests by HTTP status code.",
                    snapshot.requests.sorted { $0.key < $1.key }.map { (Labels([("code", String($0.key))]), String($0.value)) })
        text.metric("vmtemplate_errors_total", "counter", "Failed API requests by error (the codes of docs/cli.md; `code` is the HTTP status, in vmtemplate_api_requests_total).",
                    snapshot.errors.sorted { $0.key < $1.key }.map { (Labels([("error", $0.key)]), String($0.value)) })
        return text.lines.joined(separator: "\n") + "\n"
    }

    /// Label pairs, rendered once with their values escaped as the format wants (`\\`, `\"`, `\n`).
    struct Labels: Hashable {
        let text: String

        init(_ pairs: [(String, String)]) {
            text = pairs.map { name, value in
                let escaped = value.replacingOccurrences(of: "\\", with: "\\\\").replacingOccurrences(of: "\"", with: "\\\"").replacingOccurrences(of: "\n", with: "\\n")
                return "\(name)=\"\(escaped)\""
            }.joined(separator: ",")
        }
    }

    struct TextFormat {
        var lines: [String] = []

        mutating func metric(_ name: String, _ type: String, _ help: String, _ samples: [(Labels, String)]) {
            lines.append("# HELP \(name) \(help)")
            lines.append("# TYPE \(name) \(type)")
            for (labels, value) in samples { lines.append(sample(name, labels, value)) }
        }

        mutating func histogram(_ name: String, _ help: String, _ series: [(Labels, Histogram)]) {
            lines.append("# HELP \(name) \(help)")
            lines.append("# TYPE \(name) histogram")
            for (labels, histogram) in series {
                for (index, bound) in APIMetrics.latencyBuckets.enumerated() {
                    lines.append(sample("\(name)_bucket", labels, String(histogram.counts[index]), le: String(bound)))
                }
                lines.append(sample("\(name)_bucket", labels, String(histogram.count), le: "+Inf"))
                lines.append(sample("\(name)_sum", labels, String(histogram.sum)))
                lines.append(sample("\(name)_count", labels, String(histogram.count)))
            }
        }

        private func sample(_ name: String, _ labels: Labels, _ value: String, le: String? = nil) -> String {
            let all = [labels.text, le.map { "le=\"\($0)\"" }].compactMap { $0 }.filter { !$0.isEmpty }.joined(separator: ",")
            return all.isEmpty ? "\(name) \(value)" : "\(name){\(all)} \(value)"
        }
    }

    /// One rendering shared by the callers that ask within its age, and by those that ask while
    /// it is made.
    actor RenderCache {
        private var latest: (text: String, at: ContinuousClock.Instant)?
        private var running: Task<String, Never>?

        func text(maxAge: Duration, render: @escaping @Sendable () async -> String) async -> String {
            if let latest, latest.at.duration(to: .now) < maxAge { return latest.text }
            if let running { return await running.value }
            let task = Task { await render() }
            running = task
            let text = await task.value
            latest = (text, .now)
            running = nil
            return text
        }
    }

    /// Writes the text to `path` atomically (a reader, such as node_exporter, never sees half a
    /// file), readable by everyone (the collector usually runs as another user).
    /// The directory must be one only root or this user may change (``FileSystem/requireTrustedDirectory(_:for:)``):
    /// a server running as root writes there.
    package func write(to path: String, store: TemplateStore) async throws {
        try FileSystem.requireTrustedDirectory(FileSystem.split(path).directory, for: "--metrics-file")
        let text = await self.text(store: store)
        try FileSystem.writeFileAtomically(path: path, data: Array(text.utf8), mode: 0o644, durable: false)
    }
}
