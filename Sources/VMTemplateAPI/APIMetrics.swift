import Foundation
import Synchronization
import VMTemplateKit
import VMTemplateStore

/// Counters of the server, and `GET /metrics` in Prometheus' text format (0.0.4). Written here
/// rather than with a client library: a handful of counters and gauges read from the store on
/// each scrape, which the format makes a few lines of text.
public final class APIMetrics: Sendable {
    struct Counters {
        var clonesFromPool = 0
        var clonesFresh = 0
        var cloneSecondsFromPool = 0.0
        var cloneSecondsFresh = 0.0
        var requests: [Int: Int] = [:]
    }

    private let counters = Mutex(Counters())

    public init() {}

    func recordClone(fromPool: Bool, seconds: Double) {
        counters.withLock { counters in
            if fromPool {
                counters.clonesFromPool += 1
                counters.cloneSecondsFromPool += seconds
            } else {
                counters.clonesFresh += 1
                counters.cloneSecondsFresh += seconds
            }
        }
    }

    func recordRequest(status: Int) {
        counters.withLock { $0.requests[status, default: 0] += 1 }
    }

    func render(records: [CloneRecord], pools: [WarmPool.Status]) -> String {
        let snapshot = counters.withLock { $0 }
        var lines: [String] = []
        func metric(_ name: String, _ type: String, _ help: String, _ samples: [(labels: String, value: String)]) {
            lines.append("# HELP \(name) \(help)")
            lines.append("# TYPE \(name) \(type)")
            for sample in samples { lines.append("\(name)\(sample.labels.isEmpty ? "" : "{\(sample.labels)}") \(sample.value)") }
        }
        var byState: [String: Int] = [:]
        for record in records { byState[record.state.rawValue, default: 0] += 1 }
        metric("vmtemplate_clones", "gauge", "Clone records by the state vmtemplate last wrote.", byState.sorted { $0.key < $1.key }.map { ("state=\"\($0.key)\"", String($0.value)) })
        metric("vmtemplate_pool_size", "gauge", "Members each warm pool should hold.", pools.map { ("template=\"\($0.template)\"", String($0.size)) })
        metric("vmtemplate_pool_ready", "gauge", "Members ready to be handed out.", pools.map { ("template=\"\($0.template)\"", String($0.ready)) })
        metric("vmtemplate_pool_filling", "gauge", "Members being restored and warmed.", pools.map { ("template=\"\($0.template)\"", String($0.filling)) })
        metric("vmtemplate_api_clones_total", "counter", "Clones made through the API, by where they came from.", [("source=\"pool\"", String(snapshot.clonesFromPool)), ("source=\"fresh\"", String(snapshot.clonesFresh))])
        metric("vmtemplate_api_clone_seconds_total", "counter", "Time spent making them, in seconds.", [("source=\"pool\"", String(snapshot.cloneSecondsFromPool)), ("source=\"fresh\"", String(snapshot.cloneSecondsFresh))])
        metric("vmtemplate_api_requests_total", "counter", "API requests by HTTP status.", snapshot.requests.sorted { $0.key < $1.key }.map { ("code=\"\($0.key)\"", String($0.value)) })
        return lines.joined(separator: "\n") + "\n"
    }
}
