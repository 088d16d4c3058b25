import VMTemplateOS
import VMTemplateQEMU
/// Decides whether one more clone fits the store's limits.
///
/// The memory budget holds against the worst case, because a guest can write all of its RAM
/// whenever it likes: each live clone commits its copy-on-write limit (or, without one, its whole
/// guest memory) plus `qemuReserveBytes` for QEMU's own memory. Template pages are shared page
/// cache and are not counted per clone.
package enum Admission {
    /// What each clone's QEMU is assumed to need for itself (measured: ~22 MiB idle under TCG, more
    /// while its guest runs new code; docs/scaling.md).
    package static let qemuReserveBytes: UInt64 = 32 * 1024 * 1024

    /// Memory a clone commits: `min(limit, guest memory) + QEMU's reserve`.
    package static func committedBytes(guestMemory: UInt64, cowLimit: UInt64?) -> UInt64 {
        saturatingSum([min(cowLimit ?? guestMemory, guestMemory), qemuReserveBytes])
    }

    /// A sum that stops at `UInt64.max` instead of trapping: no record, however large its numbers,
    /// can crash admission, and a saturated sum is over every budget.
    package static func saturatingSum(_ values: [UInt64]) -> UInt64 {
        var total: UInt64 = 0
        for value in values {
            let (sum, overflow) = total.addingReportingOverflow(value)
            if overflow { return .max }
            total = sum
        }
        return total
    }

    /// Refuses a copy-on-write limit no record may hold (a record over the bounds is not believed,
    /// so its clone would drop out of every count: limits, list, the scheduler).
    package static func checkLimit(_ cowLimit: UInt64?) throws {
        guard let cowLimit, cowLimit > CloneRecord.maxGuestMemoryBytes else { return }
        throw VMTemplateError(.invalidArgument, "a copy-on-write limit of \(ByteSize(bytes: cowLimit)) is more than any guest has (at most \(ByteSize(bytes: CloneRecord.maxGuestMemoryBytes))): give a smaller --cow-limit.")
    }

    /// Throws `.limitExceeded` when admitting a clone committing `newCommitted` would break a limit.
    /// `live` are the committed bytes of the clones alive now.
    package static func check(settings: StoreSettings, live: [UInt64], newCommitted: UInt64) throws {
        if let maxClones = settings.maxClones, live.count + 1 > maxClones {
            throw VMTemplateError(.limitExceeded, "the store admits at most \(maxClones) live clones and \(live.count) are running: remove some (vmtemplate rm) or raise the limit (vmtemplate settings --max-clones N).")
        }
        if let budget = settings.memoryBudgetBytes {
            let committed = saturatingSum(live)
            let total = saturatingSum([committed, newCommitted])
            if total > budget {
                throw VMTemplateError(.limitExceeded, "one more clone would commit \(ByteSize(bytes: total)) of the store's \(ByteSize(bytes: budget)) memory budget (\(live.count) clones commit \(ByteSize(bytes: committed)), this one \(ByteSize(bytes: newCommitted))): give it a smaller --cow-limit, remove clones, or raise the budget (vmtemplate settings --memory-budget SIZE).")
            }
        }
    }
}
