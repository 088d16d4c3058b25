import Foundation
import VMTemplateOS
import VMTemplateQEMU
import VMTemplateStore

/// Keeps every pool of a store filled, for `vmtemplate serve` (which runs the scheduler beside
/// it, apart).
///
/// Filling is paced so that it never starves running clones of CPU: one member at a time (a
/// restore takes one core for ~50 ms and warming ~200 ms of the guest's time), then a pause of
/// `fillPause` before the next, so two cores are never both busy filling.
public struct PoolKeeper: Sendable {
    public let pool: WarmPool
    public var fillPause: Duration
    public var memberTimeout: Duration

    public init(pool: WarmPool, fillPause: Duration = .milliseconds(100), memberTimeout: Duration = .seconds(60)) {
        self.pool = pool
        self.fillPause = fillPause
        self.memberTimeout = memberTimeout
    }

    /// Fills pools until cancelled; each failure is logged and tried again a while later.
    public func run(log: @Sendable (String) -> Void) async {
        var failures = 0
        var lastRepair: ContinuousClock.Instant?
        while !Task.isCancelled {
            var made = 0
            let round = ContinuousClock.now
            // Repair reads every record: not on each round of an idle server with hundreds of
            // clones, but at the start and every 30 s, and once in a round that fills.
            func repair(unlessSince since: ContinuousClock.Instant) {
                guard lastRepair.map({ $0 < since }) ?? true else { return }
                pool.repair()
                lastRepair = .now
            }
            repair(unlessSince: round - .seconds(30))
            for (template, size) in pool.store.pools.sizes().sorted(by: { $0.key < $1.key }) where size > 0 {
                guard let name = try? EntityName(template), pool.store.templateExists(name) else { continue }
                // A full pool is seen from its ready files alone, without reading a record. A file
                // whose member died makes it look fuller than it is until the next repair.
                if pool.store.pools.readyMembers(of: name).count >= size { continue }
                repair(unlessSince: round)
                do {
                    let members = try await pool.fill(name, limit: 1, timeout: memberTimeout)
                    made += members.count
                    for member in members { log("pool \(template): member \(member.id) ready") }
                    failures = 0
                } catch is CancellationError {
                    return
                } catch {
                    failures += 1
                    log("pool \(template): filling failed: \(VMTemplateError.oneLine(error))")
                }
            }
            // Busy while there is filling to do; otherwise check twice a second. After failures,
            // back off (up to 30 s) rather than spin on a broken template.
            let pause = failures > 0 ? Duration.seconds(min(30, 1 << min(failures, 5))) : made > 0 ? fillPause : .milliseconds(500)
            try? await Task.sleep(for: pause)
        }
    }
}
